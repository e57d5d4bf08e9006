"""The GPU path: a replay on CUDA gives the CPU's profiles, and the state table never leaves the device.

These tests need a CUDA GPU and say so when they skip. The rest of the suite runs its model and pipeline
tests on the GPU with `pytest --device cuda` (conftest.py); .ci/gpu-check runs both, and the GPU
benchmarks, on a machine with one (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

from models.update_step import load_updater
from stream.generator import generate, write_jsonl
from stream.settings import Settings
from stream.state import StateTable
from tests.helpers import record_batch, replayed_log

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU found (torch.cuda.is_available() is False): the GPU path is not checked on this machine")

CUDA = torch.device("cuda")


def replayed(tmp_path, device: str) -> tuple[dict[str, dict], dict]:
    """Final profiles and the state snapshot of a replay of tmp_path/log.jsonl on `device` with the demo model."""
    return replayed_log(Settings(device=device, model_path="demo", next_items=5), tmp_path / "log.jsonl", device, 1000)


def test_a_replay_on_the_gpu_gives_the_cpus_profiles(tmp_path):
    write_jsonl(generate(users=400, events=12_000, seed=11).events, tmp_path / "log.jsonl")
    cpu, cpu_state = replayed(tmp_path, "cpu")
    gpu, gpu_state = replayed(tmp_path, "cuda")
    assert gpu.keys() == cpu.keys() and len(cpu) > 300
    assert gpu_state["user_ids"] == cpu_state["user_ids"]
    # Counters, spend and the behaviour statistics are computed on the host either way: exactly equal.
    for name in ("counts", "spend_micros", "last_ts", "cat_key", "sessions"):
        np.testing.assert_array_equal(gpu_state[name], cpu_state[name])
    # The model state: the same float32 arithmetic in another order (cuDNN's GRU kernels, TF32 off), round-off only.
    np.testing.assert_allclose(gpu_state["hidden"], cpu_state["hidden"], atol=1e-4, rtol=0)
    for user, want in cpu.items():
        got = gpu[user]
        assert (got["counts"], got["spend"], got["last_event_ts"]) == (want["counts"], want["spend"],
                                                                       want["last_event_ts"]), user
        assert got["purchase_propensity"] == pytest.approx(want["purchase_propensity"], abs=1e-3)
        assert got["churn_risk"] == pytest.approx(want["churn_risk"], abs=1e-3)
    # Rankings may swap two near-tied entries; nothing more.
    same_top = np.mean([gpu[u]["top_categories"][0]["category"] == cpu[u]["top_categories"][0]["category"]
                        for u in cpu if cpu[u]["top_categories"]])
    same_next = np.mean([gpu[u]["next_items"][:1] == cpu[u]["next_items"][:1] for u in cpu])
    assert same_top >= 0.99 and same_next >= 0.98, (same_top, same_next)


def test_the_state_table_stays_on_the_gpu_as_it_grows_expires_and_is_written_out():
    updater = load_updater(Settings(device="cuda", model_path="demo", input_topics=("events",),
                                    state_ttl_ms=30 * 86_400_000, dedupe_window=4))
    assert next(updater.model.parameters()).is_cuda
    events = generate(users=3000, events=20_000, seed=12).events  # 3000 users: the table grows past 1024 rows
    for start in range(0, len(events), 5000):
        part = events[start:start + 5000]
        result = updater.process(record_batch([orjson.dumps(e) for e in part], first_offset=start,
                                              keys=[str(e["user_id"]).encode() for e in part]))
        assert result.profiles
        assert updater.state.states.is_cuda
    # Two years later: a new user's events expire everyone else (rows dropped on the device).
    expired = 0
    for i in range(2):
        late = dict(events[-1], user_id="late-user", event_id=f"late-{i}", ts=events[-1]["ts"] + 730 * 86_400_000 + i)
        result = updater.process(record_batch([orjson.dumps(late)], first_offset=len(events) + i, keys=[b"late-user"]))
        expired += len(result.expired.users)
    held = len(updater.state)
    assert updater.state.states.is_cuda and expired > 2000 and held < 1000
    # The changelog's records carry the device's states; loading them into a fresh CUDA table gives them back.
    values = updater.state.changelog_values(np.arange(held))
    fresh = StateTable(updater.state.state_size, CUDA, watermark_slots=1, dedupe_window=4)
    assert fresh.load_changelog(dict(zip((u.encode() for u in updater.state.user_ids), values))) == held
    assert fresh.states.is_cuda
    torch.testing.assert_close(fresh.states[:held], updater.state.states[:held], atol=0, rtol=0)
