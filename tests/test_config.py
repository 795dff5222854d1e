import pytest

from smollm2.checkpoint import check_model_matches
from smollm2.config import load_config, load_saved_config, to_dict, to_yaml
from smollm2.errors import CheckpointError, ConfigError


def test_presets_load(root):
    spec = load_config(root / "configs/smollm2_135.yaml")
    assert (spec.model.n_layer, spec.model.d_model, spec.model.n_head, spec.model.d_mlp) == (12, 768, 12, 3072)
    assert spec.model.vocab_size == 50258 and spec.model.max_seq_len == 2048
    assert (spec.optim.lr, spec.optim.weight_decay, spec.optim.grad_clip, spec.train.grad_accum) == (5e-4, 0.1, 1.0, 4)
    assert (spec.train.max_steps, spec.eval.interval, spec.checkpoint.interval, spec.sample.interval) == (5000, 100, 500, 200)
    g = spec.generate
    assert (g.temperature, g.top_k, g.top_p, g.max_new_tokens) == (1.0, 50, 0.95, 100)
    assert spec.train.dtype == "bf16"
    tiny = load_config(root / "configs/tiny.yaml")
    assert tiny.model.d_model < 256


def test_override_reaches_resolved_config(root):
    cfg = load_config(root / "configs/tiny.yaml", ["train.max_steps=7", "logging.wandb.mode=offline", "train.resume=latest"])
    assert cfg.train.max_steps == 7 and cfg.logging.wandb.mode == "offline" and cfg.train.resume == "latest"


@pytest.mark.parametrize("overrides, message", [
    (["train.max_step=7"], "unknown config key 'train.max_step'; did you mean 'train.max_steps'?"),
    (["optim.lrr=1"], "did you mean 'optim.lr'"),
    (["train.max_steps=abc"], "bad value for 'train.max_steps'"),
    (["data.seq_len=4096"], "data.seq_len (4096) must be <= model.max_seq_len (2048)"),
    (["train.max_steps=0"], "train.max_steps must be positive"),
    (["train.max_steps=-3"], "train.max_steps must be positive"),
    (["generate.top_p=0"], "generate.top_p must be in (0, 1]"),
    (["generate.top_p=1.5"], "generate.top_p must be in (0, 1]"),
    (["train.dtype=fp16"], "train.dtype must be one of bf16, fp32"),
    (["train=3"], "'train' is a section"),
    (["nonsense"], "not of the form key=value"),
])
def test_invalid_overrides(root, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(root / "configs/smollm2_135.yaml", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_layers: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.n_layers'; did you mean 'model.n_layer'"):
        load_config(path)
    path.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_error_is_one_line_without_traceback(monkeypatch, capsys):
    from smollm2.errors import run_cli
    from smollm2.model.__main__ import main

    monkeypatch.delenv("SMOLLM2_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, ["--config", "configs/tiny.yaml", "model.n_layr=2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: command line: unknown config key 'model.n_layr'; "
                                       "did you mean 'model.n_layer'?\n")


def test_typed_choices_and_auto_switches(root):
    cfg = load_config(root / "configs/tiny.yaml", ["train.compile=true", "optim.fused=false", "train.fsdp_wrap=root"])
    assert cfg.train.compile is True and cfg.optim.fused is False and cfg.train.fsdp_wrap == "root"
    auto = load_config(root / "configs/tiny.yaml", ["train.compile=null"])
    assert auto.train.compile is None and auto.optim.fused is None  # null = auto
    assert to_dict(cfg)["train"]["fsdp_wrap"] == "root" and type(to_dict(cfg)["train"]["fsdp_wrap"]) is str
    assert f"{cfg.train.dtype}" == "fp32" and str(cfg.logging.wandb.mode) == "disabled"


@pytest.mark.parametrize("override, message", [
    ("train.compile=auto", "train.compile must be true, false or null (null = auto) (got 'auto')"),
    ("optim.fused=maybe", "optim.fused must be true, false or null"),
    ("train.activation_checkpointing=some", "train.activation_checkpointing must be one of none, full, selective"),
    ("train.fsdp_wrap=layer", "train.fsdp_wrap must be one of auto, block, root"),
    ("optim.schedule=linear", "optim.schedule must be one of cosine, wsd, constant"),
    ("logging.wandb.mode=on", "logging.wandb.mode must be one of auto, disabled, offline, online"),
    ("model.attention=flash", "model.attention must be one of auto, sdpa, flash_attn, naive"),
])
def test_bad_choice_names_the_key_and_the_choices(root, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(root / "configs/tiny.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["generate.temperature=inf"], "invalid config: generate.temperature must be a finite number (got inf)"),
    (["train.dist_timeout_min=inf"], "invalid config: train.dist_timeout_min must be a finite number (got inf)"),
    (["optim.lr=nan"], "invalid config: optim.lr must be a finite number (got nan)"),
    (["train.run_dir=${nope}"], "invalid config: train.run_dir is an interpolation that does not resolve (Interpolation "
                                "key 'nope' not found)"),
    (["train.init_from=ckpt/x", "train.resume=latest"], "invalid config: train.init_from (ckpt/x) and train.resume / "
                                                         "--resume (latest) are exclusive"),
])
def test_values_that_could_only_fail_later_are_refused_now(root, overrides, message):
    """Checked when the config is read (the training command's catalog rows show the same lines at the CLI)."""
    with pytest.raises(ConfigError) as err:
        load_config(root / "configs/tiny.yaml", overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


MIX = "data.mixture=[{path: data/a, weight: 3}, {path: data/b, weight: 1}]"


@pytest.mark.parametrize("overrides, message", [
    (["data.mixture=[{path: data/a}]"], "invalid config: data.mixture[0].weight is missing: a positive number"),
    (["data.mixture=[{path: data/a, weight: 1}, {path: data/b, weight: -1}]"],
     "invalid config: data.mixture[1].weight must be positive (got -1.0)"),
    (["data.mixture=[{weight: 1}]"], "invalid config: data.mixture[0].path is missing: a prepared dataset directory"),
    (["data.mixture=[{path: data/a, wieght: 1}]"], "override 'data.mixture=[{path: data/a, wieght: 1}]': bad value for "
                                                  "'wieght': Key 'wieght' not in 'MixtureSource'"),
    (["data.mixture=[{path: data/a, weight: 1}, {path: other/a, weight: 1}]"],
     "invalid config: data.mixture[1].name 'a' names two sources of data.mixture: give each a name"),
    ([MIX, "data.stages=[{start_step: 0, mixture: [{path: data/a, weight: 1}]}]"],
     "invalid config: data.mixture and data.stages are exclusive"),
    (["data.stages=[{start_step: 5, mixture: [{path: data/a, weight: 1}]}]"],
     "invalid config: data.stages[0].start_step of the first stage must be 0 (got 5)"),
    (["data.stages=[{start_step: 0, mixture: [{path: data/a, weight: 1}]}, {start_step: 0, mixture: []}]"],
     "invalid config: data.stages[1].mixture lists no source"),
    (["data.stages=[{start_step: 0, mixture: [{path: data/a, weight: 1}]}, {start_step: 0, mixture: "
      "[{path: data/b, weight: 1}]}]"], "invalid config: data.stages[1].start_step (0) must be after the previous "
                                        "stage's (0)"),
    (["data.stages=[{start_step: 0, mixture: [{path: data/a, weight: 1}]}, {start_step: 9, mixture: "
      "[{path: x/a, weight: 1}]}]"], "invalid config: data.stages source 'a' has two paths (data/a, x/a)"),
    (["data.position_reset=true"], "invalid config: data.position_reset needs model.document_masking=true"),
])
def test_a_bad_mixture_is_one_line(root, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(root / "configs/tiny.yaml", overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_mixture_reads_from_flow_yaml_and_survives_a_saved_config(root, tmp_path):
    cfg = load_config(root / "configs/tiny.yaml", [MIX])
    assert [(s.path, s.weight, s.name) for s in cfg.data.mixture] == [("data/a", 3.0, None), ("data/b", 1.0, None)]
    assert cfg.data.tokenizer_path() == "data/a" and cfg.data.stage_list()[0].start_step == 0
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert load_saved_config(tmp_path / "config.yaml") == cfg == load_config(tmp_path / "config.yaml")


def test_max_seq_len_does_not_block_a_resume(root, tmp_path):
    """No tensor depends on model.max_seq_len (RoPE angles are computed per position): a checkpoint's model section may
    differ there, but not in a shape."""
    saved = to_dict(load_config(root / "configs/tiny.yaml").model)
    check_model_matches({"model": saved}, load_config(root / "configs/tiny.yaml", ["model.max_seq_len=256"]), tmp_path)
    with pytest.raises(CheckpointError, match="model.n_layer: checkpoint 2, config 3"):
        check_model_matches({"model": saved}, load_config(root / "configs/tiny.yaml", ["model.n_layer=3"]), tmp_path)



def test_a_checkpoint_from_before_the_architecture_keys_was_written_with_their_defaults(root, tmp_path):
    """A model section without n_kv_head, norm, mlp, bias, tie_embeddings (checkpoints before them) is the default
    architecture: it resumes under it, and another one is refused naming the key. n_kv_head null and = n_head agree."""
    old = {k: v for k, v in to_dict(load_config(root / "configs/tiny.yaml").model).items()
           if k not in ("n_kv_head", "norm", "mlp", "bias", "tie_embeddings")}
    check_model_matches({"model": old}, load_config(root / "configs/tiny.yaml", ["model.n_kv_head=4"]), tmp_path)
    for override, message in [("model.tie_embeddings=false", "model.tie_embeddings: checkpoint True, config False"),
                              ("model.norm=rmsnorm", "model.norm: checkpoint 'layernorm', config 'rmsnorm'"),
                              ("model.n_kv_head=2", "model.n_kv_head: checkpoint 4, config 2")]:
        with pytest.raises(CheckpointError, match=message):
            check_model_matches({"model": old}, load_config(root / "configs/tiny.yaml", [override]), tmp_path)


# ------------------------------------------------------------------------------------------------ saved configs


def test_a_saved_config_carries_its_version_and_works_as_a_preset(root, tmp_path):
    from smollm2.config import CONFIG_VERSION, to_yaml

    cfg = load_config(root / "configs/tiny.yaml", ["train.max_steps=7"])
    text = to_yaml(cfg)
    assert text.startswith(f"config_version: {CONFIG_VERSION}\n") and to_dict(cfg)["config_version"] == CONFIG_VERSION
    (tmp_path / "config.yaml").write_text(text)
    assert load_config(tmp_path / "config.yaml") == cfg  # users relaunch from a run's config.yaml
    (tmp_path / "newer.yaml").write_text(text.replace(f"config_version: {CONFIG_VERSION}", "config_version: 99"))
    with pytest.raises(ConfigError, match="written by a newer smollm2 \\(config_version 99\\)"):
        load_config(tmp_path / "newer.yaml")


def test_a_saved_config_is_read_leniently(root, tmp_path, capsys):
    """What an older or newer version saved: unknown keys and values no longer accepted are dropped with one warning
    naming them, missing keys take their defaults, the rest loads as saved."""
    from smollm2.config import Config, load_saved_config

    saved = to_dict(load_config(root / "configs/tiny.yaml", ["optim.lr=0.25"]))
    saved["config_version"] = 99
    saved["model"]["experts"] = 8  # added by a newer version
    saved["train"]["dtype"] = "fp8"  # a value this version does not accept
    saved["curriculum"] = {"stages": 3}  # a whole new section
    del saved["optim"]["beta2"]  # a key the saving version did not have
    cfg = load_saved_config(saved, "runs/x/config.yaml")
    assert capsys.readouterr().err == ("warning: runs/x/config.yaml: ignoring what this version does not know (written by "
                                       "a newer smollm2: config_version 99): model.experts, train.dtype='fp8', "
                                       "curriculum\n")
    assert cfg.optim.lr == 0.25 and cfg.optim.beta2 == Config().optim.beta2 and cfg.train.dtype == Config().train.dtype
    assert cfg.model.d_model == 64  # tiny's, as saved
    (tmp_path / "config.yaml").write_text("model:\n  d_model: 63\n")  # breaks a constraint: an error naming the file
    with pytest.raises(ConfigError, match="config.yaml: invalid config: model.d_model"):
        load_saved_config(tmp_path / "config.yaml")


def test_the_model_keys_a_resume_may_change_are_marked_beside_their_fields():
    from smollm2.config import MAY_DIFFER_ON_RESUME

    assert MAY_DIFFER_ON_RESUME == {"max_seq_len", "attention", "init_std", "document_masking"}


def test_wandb_log_model_is_checked_not_rewritten(root):
    cfg = load_config(root / "configs/tiny.yaml", ["logging.wandb.log_model=true"])
    assert cfg.logging.wandb.log_model.lower() == "true"  # validation leaves the value as given; tracking resolves it
    from smollm2.observe.tracking import wandb_settings

    assert wandb_settings(cfg.logging.wandb, {}).log_model == "checkpoint"
