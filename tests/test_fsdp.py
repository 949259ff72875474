"""Launches the trainer cannot run correctly stop with one line before anything is written: several processes
that accelerate would each run alone (``torchrun`` on a CPU machine, a stray ``WORLD_SIZE``), and FSDP."""
from __future__ import annotations

import sys

import pytest

from conftest import REPO, error_lines, free_port, run_script


def args(model, out):
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(REPO / "assets/cnt/cat"),
            "--instance_prompt", "a photo of a <c> cat", "--resolution", "64", "--max_train_steps", "1",
            "--output_dir", str(out)]


@pytest.mark.parametrize("env, says", [
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, "no MASTER_ADDR"),
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP launches are not supported yet"),
])
def test_refused_in_process(tiny_sd3, tmp_path, monkeypatch, capsys, env, says):
    from qrlora.cli.train import main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(args(tiny_sd3, tmp_path / "out"))
    assert exc.value.code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and says in lines[0]
    assert "WORLD_SIZE" not in env or "accelerate launch --num_processes N" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_on_cpu_is_refused_in_every_process(tiny_sd3, tmp_path):
    """torchrun forms a rendezvous, but accelerate on the CPU leaves each process alone: both must stop."""
    proc = run_script([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                       "--master_port", str(free_port()), "-m", "qrlora.train",
                       *args(tiny_sd3, tmp_path / "out")], check=False)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 2 and all("runs it as a single process" in line for line in lines), proc.stderr[-2000:]
    assert {line.split("rank ")[1].split(" ")[0] for line in lines} == {"0", "1"}
    assert not (tmp_path / "out").exists()
