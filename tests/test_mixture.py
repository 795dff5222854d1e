"""Mixtures: one global (source, window) sequence by the weights, the same at any world size, resumed exactly; per-source
epochs; stages; the checks on open; the documents a masked batch carries."""

import json

import numpy as np
import pytest
import tiny

from data_prep.prep import PrepOptions, prepare
from smollm2.config import load_config
from smollm2.data.loader import document_ids
from smollm2.data.mixture import open_training_data
from smollm2.data.shards import write_shard
from smollm2.errors import DataError

SEQ_LEN = 8
# Each source's tokens are its own range of ids, so a window names its source and its window id.
SOURCES = {"web": (0, 4001), "code": (20_000, 1201), "math": (40_000, 401)}  # base, tokens: 500, 150, 50 windows
WEIGHTS = {"web": 0.7, "code": 0.2, "math": 0.1}


@pytest.fixture(scope="module")
def source_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    for name, (base, size) in SOURCES.items():
        (root / name).mkdir()
        write_shard(root / name / f"{name}_train_000000.bin", np.arange(base, base + size))
        write_shard(root / name / f"{name}_val_000000.bin", np.arange(base, base + 100))
    return root


def mixture_arg(root, weights=WEIGHTS) -> str:
    return "[" + ", ".join(f"{{path: {root / n}, weight: {w}}}" for n, w in weights.items()) + "]"


def stages_arg(root, *stages) -> str:
    return "[" + ", ".join(f"{{start_step: {s}, mixture: {mixture_arg(root, w)}}}" for s, w in stages) + "]"


def config(data: str, micro_batch=2, grad_accum=1, *extra):
    key = "data.stages" if "start_step" in data else "data.mixture"
    return load_config("configs/tiny.yaml", [f"{key}={data}", f"data.seq_len={SEQ_LEN}", f"data.micro_batch={micro_batch}",
                                             f"train.grad_accum={grad_accum}", "data.prefetch=0", "eval.windows=6", *extra])


def loaders(cfg, world_size):
    return [open_training_data(cfg, r, world_size, "cpu", False).loader for r in range(world_size)]


def identify(token: int) -> tuple[str, int]:
    name = max((n for n, (base, _) in SOURCES.items() if token >= base), key=lambda n: SOURCES[n][0])
    return name, (token - SOURCES[name][0]) // SEQ_LEN


def take(ranks, steps):
    """The global (source, window) stream `steps` steps of these ranks consume (rank order within a step)."""
    out = []
    for _ in range(steps):
        for ld in ranks:
            for inputs, targets in ld.next_step():
                out += [identify(int(x[0])) for x in inputs]
                assert (targets == inputs + 1).all()  # each window is one source's consecutive tokens
    return out


def test_the_sequence_is_the_same_at_any_world_size_and_resumes_exactly(source_dirs):
    data = mixture_arg(source_dirs)
    reference = take(loaders(config(data, 1, 1), 1), 240)  # one window per step
    two = loaders(config(data, 2, 2), 2)  # G = 8
    stream = take(two, 10)
    state = json.loads(json.dumps(two[0].state_dict()))  # through JSON, as train_state.json holds it
    assert state == two[1].state_dict()
    for shape, steps in [((3, 1, 3), 6), ((1, 1, 1), 10), ((2, 3, 1), 7)]:  # (micro, accum, world)
        micro, accum, world = shape
        resumed = loaders(config(data, micro, accum), world)
        for ld in resumed:
            ld.load_state_dict(state)
        stream += take(resumed, steps)
        state = json.loads(json.dumps(resumed[0].state_dict()))
    assert stream == reference[: len(stream)]
    counts = {n: sum(1 for s, _ in stream if s == n) for n in SOURCES}
    assert {n: state["sources"][n]["consumed_windows"] for n in SOURCES} == counts
    assert state["consumed_windows"] == len(stream) == sum(counts.values())


@pytest.mark.parametrize("weights", [WEIGHTS, {"web": 0.55, "code": 0.3, "math": 0.15},
                                     {"web": 7, "code": 1.5, "math": 0.8}])
def test_shares_stay_within_one_percent_over_any_100_steps(source_dirs, weights):
    stream = take(loaders(config(mixture_arg(source_dirs, weights), 2, 2), 1), 400)  # G = 4
    total = sum(weights.values())
    sources = np.array([s for s, _ in stream])
    for name, w in weights.items():
        drawn = np.concatenate([[0], np.cumsum(sources == name)])
        per_100_steps = (drawn[400:] - drawn[:-400]) / 400  # every span of 100 steps (400 windows)
        assert np.abs(per_100_steps - w / total).max() <= 0.01, name


def test_each_source_repeats_its_own_epochs_with_a_new_shuffle(source_dirs, capsys):
    ld = loaders(config(mixture_arg(source_dirs), 2, 2), 1)[0]  # math: 50 windows, 10% of 4 a step: an epoch in 125
    stream = take([ld], 260)
    math_windows = [w for s, w in stream if s == "math"]
    epoch0, epoch1 = math_windows[:50], math_windows[50:100]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50)) and epoch0 != epoch1
    events, drawn = ld.take_news()  # 1040 windows: web 728 of 500, code 208 of 150, math 104 of 50
    assert sorted(events) == sorted([f"data: source '{name}' started epoch {e} (a new shuffle of its {n} windows)"
                                     for name, e, n in [("web", 1, 500), ("code", 1, 150), ("math", 1, 50),
                                                        ("math", 2, 50)]])
    assert drawn == {"web": 728, "code": 208, "math": 104}
    assert ld.state_dict()["sources"]["math"]["epoch"] == 2


def test_a_stage_changes_the_mixture_at_its_step_and_resumes_on_both_sides(source_dirs):
    data = stages_arg(source_dirs, (0, {"web": 1, "code": 1}), (5, {"math": 1, "code": 3}))
    reference = take(loaders(config(data, 2, 2), 1), 12)  # G = 4: the stage starts at window 20
    assert {s for s, _ in reference[:20]} == {"web", "code"} and {s for s, _ in reference[20:]} == {"math", "code"}
    assert [s for s, _ in reference[20:28]] == ["code", "code", "math", "code"] * 2  # the deficit order of 3:1
    for stop in (3, 5, 8):  # before, at and after the boundary
        first = loaders(config(data, 2, 2), 1)
        stream = take(first, stop)
        resumed = loaders(config(data, 1, 2), 2)
        for ld in resumed:
            ld.load_state_dict(first[0].state_dict())
        assert stream + take(resumed, 12 - stop) == reference, stop


def test_a_changed_mixture_resumes_with_a_warning_and_other_data_is_refused(source_dirs):
    ld = loaders(config(mixture_arg(source_dirs), 2, 2), 1)[0]
    take([ld], 5)
    state = ld.state_dict()
    changed = loaders(config(mixture_arg(source_dirs, {"web": 0.5, "code": 0.5}), 2, 2), 1)[0]
    changed.load_state_dict(state)
    assert changed.changed == ["the checkpoint's sources math are no longer drawn",
                               "the mixture differs from the checkpoint's: from step 5 on, it draws by this run's weights"]
    assert changed.cursor.consumed == (state["sources"]["web"]["consumed_windows"],
                                       state["sources"]["code"]["consumed_windows"])
    single = open_training_data(load_config("configs/tiny.yaml", [f"data.path={source_dirs / 'web'}",
                                                                  f"data.seq_len={SEQ_LEN}"]), 0, 1, "cpu", False).loader
    with pytest.raises(DataError, match="drew from a mixture of web, code, math; this run from one dataset"):
        single.load_state_dict(state)
    with pytest.raises(DataError, match="drew from one dataset"):
        ld.load_state_dict(single.state_dict())
    renamed = config(f"[{{path: {source_dirs / 'code'}, weight: 1, name: web}}]", 2, 2)
    with pytest.raises(DataError, match="source 'web': windows_per_epoch=500, this run has 150"):
        loaders(renamed, 1)[0].load_state_dict(state)


def test_open_checks_every_source_and_announces_repeats(source_dirs, tmp_path):
    data = open_training_data(config(mixture_arg(source_dirs), 2, 2, "train.max_steps=1000"), 0, 1, "cpu", False)
    assert data.notes[0] == "data: from step 0: web 70.0%, code 20.0%, math 10.0%"
    assert data.notes[1:] == [  # 4000 windows: web 2800 of 500, code 800 of 150, math 400 of 50
        "data: source 'web' (500 windows) is drawn about 5.6 times over by step 1000: it repeats, with a new shuffle "
        "each epoch",
        "data: source 'code' (150 windows) is drawn about 5.3 times over by step 1000: it repeats, with a new shuffle "
        "each epoch",
        "data: source 'math' (50 windows) is drawn about 8.0 times over by step 1000: it repeats, with a new shuffle "
        "each epoch"]
    assert {n: v.num_windows for n, v in data.val.items()} == {"web": 2, "code": 2, "math": 2}  # eval.windows=6
    with pytest.raises(DataError, match="no prepared dataset at .*/nowhere"):
        open_training_data(config(mixture_arg(source_dirs, {"web": 1, "nowhere": 1})), 0, 1, "cpu", False)
    (tmp_path / "small").mkdir()
    write_shard(tmp_path / "small" / "s_train_000000.bin", np.arange(5))
    small = f"[{{path: {source_dirs / 'web'}, weight: 1}}, {{path: {tmp_path / 'small'}, weight: 1}}]"
    with pytest.raises(DataError, match="small: the train split has 5 tokens, fewer than one window"):
        open_training_data(config(small), 0, 1, "cpu", False)


def test_document_ids_restart_after_each_eos():
    eos = 9
    inputs = np.array([[1, 2, eos, 3, 4, eos, eos, 5],   # three documents and an empty one between two EOS
                       [1, 2, 3, 4, 5, 6, 7, eos]])      # one document: its EOS is its last token
    doc_ids, positions = document_ids(inputs, eos)
    assert doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 2, 3], [0] * 8]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 0, 0], list(range(8))]
    assert document_ids(inputs[1:], eos) is None  # no window holds two documents: today's path


def test_every_source_must_share_the_tokenizer(source_dirs, tmp_path):
    texts = ["ROMEO: But soft, what light through yonder window breaks?", "JULIET: O Romeo, Romeo!"] * 20
    (tmp_path / "corpus.txt").write_text("\n".join(texts))
    other = tiny.train_tokenizer(tmp_path / "other" / "tokenizer.json", texts, 300)
    other_data = prepare(PrepOptions(source=str(tmp_path / "corpus.txt"), out=str(tmp_path / "other-data"),
                                     tokenizer=str(other), val_fraction=0.0, progress=False, workers=1)).out
    mixed = f"[{{path: {source_dirs / 'web'}, weight: 1}}, {{path: {other_data}, weight: 1, name: other}}]"
    with pytest.raises(DataError, match=r"source 'other' \(.*other-data\) was tokenized with other \(300 ids, EOS 0\), "
                                        r"source 'web' \(.*web\) with gpt2 \(50,258 ids, EOS 50256\): every source"):
        open_training_data(config(mixed), 0, 1, "cpu", False)


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """Three sources of random GPT-2 ids in documents of ~12 tokens (an EOS each): windows of 16 hold several."""
    root, rng = tmp_path_factory.mktemp("documents"), np.random.default_rng(0)
    for name, size in [("web", 6000), ("code", 2000), ("math", 900)]:
        for split, n in [("train", size), ("val", 400)]:
            tokens = rng.integers(0, 50256, n)
            tokens[rng.random(n) < 1 / 12] = 50256
            (root / name).mkdir(exist_ok=True)
            write_shard(root / name / f"{name}_{split}_000000.bin", tokens)
    return root


@pytest.mark.e2e
def test_a_staged_masked_mixture_trains_on_2_ranks_and_resumes_at_1_and_3(documents, tmp_path):
    """2 ranks to step 4, 1 rank to 8 (across the stage boundary at 6), 3 ranks to 10, at the same global batch: each
    source's consumed windows equal an uninterrupted run's (the sequence itself: the in-process tests above)."""
    stages = stages_arg(documents, (0, WEIGHTS), (6, {"math": 1, "code": 1}))
    run = tmp_path / "run"
    common = [*tiny.SMALL, f"data.stages={stages}", "model.document_masking=true", "eval.interval=4", "eval.windows=6"]
    first = tiny.train(2, run, documents, *common, *tiny.SHAPE[2], "train.max_steps=4")
    assert "document masking: sdpa + mask (positions restart at each document)" in first.stdout
    assert "data: from step 0: web 70.0%, code 20.0%, math 10.0%" in first.stdout
    second = tiny.train(0, run, documents, *common, *tiny.SHAPE[1], "train.max_steps=8", "--resume", "latest")
    assert "resumed from" in second.stdout and "warning" not in second.stdout
    tiny.train(3, run, documents, *common, *tiny.SHAPE[3], "train.max_steps=10", "--resume", "latest")
    saved = json.loads((run / "checkpoints" / "latest" / "train_state.json").read_text())["loader"]

    cfg = load_config("configs/tiny.yaml", [*common, *tiny.SHAPE[1], "data.prefetch=0"])
    reference = open_training_data(cfg, 0, 1, "cpu", True).loader
    for _ in range(10):
        reference.next_step()
    assert saved == json.loads(json.dumps(reference.state_dict()))
    assert saved["stage"] == 1 and saved["stage_start_windows"] == 6 * 12
    records = tiny.records(run)
    assert all(np.isfinite(r["loss"]) for r in records)
    last = records[-1]
    assert {n: last[f"data/{n}/tokens"] for n in SOURCES} == {n: 16 * s["consumed_windows"]
                                                              for n, s in saved["sources"].items()}
    assert last["data/web/share"] == 0 and last["data/math/share"] == last["data/code/share"] == 0.5
    evals = tiny.records(run, "eval.jsonl")
    assert {k for k in evals[-1] if k.startswith("eval/")} == {f"eval/{n}/val_loss" for n in SOURCES}


def test_a_resume_keeps_its_stage_when_only_later_stages_or_the_listing_order_change(source_dirs):
    data = stages_arg(source_dirs, (0, {"web": 1, "code": 1}), (50, {"math": 1}))
    reference = take(loaders(config(data, 2, 2), 1), 12)
    first = loaders(config(data, 2, 2), 1)
    stream = take(first, 7)
    later = loaders(config(stages_arg(source_dirs, (0, {"web": 1, "code": 1}), (60, {"math": 1})), 2, 2), 1)[0]
    later.load_state_dict(first[0].state_dict())
    assert later.changed == ["the stages after this one differ from the checkpoint's: they apply when reached"]
    reordered = loaders(config(stages_arg(source_dirs, (0, {"code": 1, "web": 1}), (50, {"math": 1})), 2, 2), 1)[0]
    reordered.load_state_dict(first[0].state_dict())
    assert reordered.changed == []
    assert stream + take([later], 5) == reference and stream + take([reordered], 5) == reference
