"""`python -m smollm2.checkpoint run-dir / latest-step`: what launch/*.sh ask instead of parsing configs and step names.
Run in this process through the same wrapper the command uses (its exit status, stdout and stderr)."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from smollm2.checkpoint import COMPLETE, checkpoint_step, step_dir_name
from smollm2.checkpoint.__main__ import main
from smollm2.config import load_config
from smollm2.errors import CheckpointError, run_cli


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """`python -m smollm2.checkpoint ARGS` as users see it: exit status, stdout, stderr (errors as one line)."""
    monkeypatch.delenv("SMOLLM2_TRACEBACK", raising=False)

    def run(*args) -> Result:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            run_cli(main, [str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(exit_.value.code, out, err)

    return run


def assert_one_line_error(proc: Result, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert proc.stdout == ""


def fake_checkpoint(ckpt_root: Path, name: str, complete: bool = True) -> Path:
    """A directory with what `is_complete` looks for (or without its COMPLETE marker: a save that was cut short)."""
    path = ckpt_root / name
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"")
    (path / "meta.json").write_text("{}")
    if complete:
        (path / COMPLETE).write_text("\n")
    return path


def test_run_dir_prints_the_resolved_run_dir(cli, tmp_path):
    default = cli("run-dir", "configs/tiny.yaml")
    assert default.returncode == 0, default.stderr
    assert default.stdout == load_config("configs/tiny.yaml").train.run_dir + "\n"

    overridden = cli("run-dir", "configs/tiny.yaml", "train.max_steps=7", f"train.run_dir={tmp_path / 'mine'}")
    assert overridden.returncode == 0, overridden.stderr
    assert overridden.stdout == f"{tmp_path / 'mine'}\n"


def test_run_dir_rejects_a_bad_key_or_file_in_one_line(cli):
    assert_one_line_error(cli("run-dir", "configs/tiny.yaml", "train.no_such_key=1"), "train.no_such_key")
    assert_one_line_error(cli("run-dir", "configs/no_such_config.yaml"), "config file not found")


def test_latest_step_is_the_newest_complete_checkpoint(cli, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    fake_checkpoint(ckpts, step_dir_name(10))
    fake_checkpoint(ckpts, step_dir_name(200))
    fake_checkpoint(ckpts, f".tmp-{step_dir_name(300)}", complete=False)  # killed before its rename
    fake_checkpoint(ckpts, step_dir_name(400), complete=False)  # a step name without its marker
    (ckpts / "latest").symlink_to(step_dir_name(10))  # a stale link: the scan decides, not the link
    proc = cli("latest-step", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "200\n"


def test_latest_step_without_a_checkpoint_exits_2(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("latest-step", tmp_path / "empty"), "no complete checkpoint")
    fake_checkpoint(tmp_path / "partial" / "checkpoints", f".tmp-{step_dir_name(5)}", complete=False)
    assert_one_line_error(cli("latest-step", tmp_path / "partial"), "no complete checkpoint")


def test_checkpoint_step(tmp_path):
    ckpt = fake_checkpoint(tmp_path, step_dir_name(1234))
    assert checkpoint_step(ckpt) == 1234
    assert checkpoint_step(str(ckpt)) == 1234
    assert checkpoint_step(tmp_path / "step-1000000") == 1_000_000  # more than six digits
    (tmp_path / "latest").symlink_to(ckpt.name)
    assert checkpoint_step(tmp_path / "latest") == 1234
    for bad in (tmp_path / f".tmp-{step_dir_name(5)}", tmp_path / "step-12", tmp_path):
        with pytest.raises(CheckpointError, match="not a checkpoint directory"):
            checkpoint_step(bad)


def test_latest_step_verify_skips_a_damaged_newest(cli, tmp_path):
    """What launch/slurm.sbatch asks: the newest checkpoint whose files check out (a damaged final checkpoint used to be
    reported, and then taken as verified)."""
    ckpts = tmp_path / "run" / "checkpoints"
    fake_checkpoint(ckpts, step_dir_name(10))
    damaged = fake_checkpoint(ckpts, step_dir_name(20))
    (damaged / "meta.json").write_text('{"step": 20, "files": {".metadata": {"bytes": 7, "sha256": "0"}}}')
    assert cli("latest-step", tmp_path / "run").stdout == "20\n"
    checked = cli("latest-step", "--verify", tmp_path / "run")
    assert checked.returncode == 0 and checked.stdout == "10\n", checked.stderr
    assert f"warning: skipping {damaged} is damaged: .metadata has 0 bytes, 7 were written" in checked.stderr


def test_a_meta_json_that_is_not_an_object_is_reported_and_list_goes_on(cli, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    fake_checkpoint(ckpts, step_dir_name(10))
    odd = fake_checkpoint(ckpts, step_dir_name(20))
    (odd / "meta.json").write_text("[1, 2]")
    listed = cli("list", tmp_path / "run")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["10", "20"]
    assert f"unreadable: {odd}/meta.json is unreadable: a JSON list, not an object" in listed.stdout
    assert_one_line_error(cli("verify", tmp_path / "run", "20"), f"{odd}/meta.json is unreadable: a JSON list")
