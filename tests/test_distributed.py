"""``fedrefine fit`` under Lightning's DDP on CPU (gloo): two processes, disjoint shards, one exported fuser."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent


def test_ddp_fit_on_two_cpu_processes_shards_the_stream_and_exports_one_fuser(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(
        json.dumps({"conversations": [{"from": "human", "value": f"What is item {i}?"},
                                      {"from": "gpt", "value": f"Item {i} is number {i}."}]}) + "\n"
        for i in range(32)
    ))
    probe = {"class_path": "stream_probe.RecordTrainedResponses", "init_args": {"directory": str(tmp_path / "seen")}}
    command = [
        sys.executable, "-m", "fedrefine.cli", "fit", "--config", "configs/tiny.yaml",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", json.dumps([probe]),
        "--trainer.default_root_dir", str(tmp_path), "--model.export_dir", str(tmp_path / "fuser"),
        "--data.train_path", str(chat), "--data.train_samples", "32", "--data.shuffle_buffer", "0",
    ]
    env = os.environ | {"PYTHONPATH": str(REPO / "tests"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / "seen" / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert len(seen[0]) == len(seen[1]) == 16  # 2 steps of 8 on each rank
    assert set(seen[0]).isdisjoint(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 32  # together: every row once
    assert (tmp_path / "fuser" / "fuser.safetensors").is_file()
    assert done.stdout.count("Exported to") == 1  # rank 0 only
