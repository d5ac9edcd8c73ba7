"""Multi-node training as docs/training.md describes it: two torchrun "nodes" (one rank each, gloo,
static rendezvous on the loopback address) train exactly as one node with two ranks; a node that
dies stops the run, and ``resume=`` on every node continues it to the same weights."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, SMALL_TRAINING, script_environment, write_scene_images
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.slow,  # torchrun launches, seconds each
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc"),
]

EPOCHS = 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def training(tmp_path, run_dir, *overrides) -> list[str]:
    """scripts/train.py overrides: 2 training images, one view each, no held-out set, 1 view per
    rank per step: 1 optimizer step per epoch, a checkpoint after each."""
    return [
        str(ROOT / "scripts" / "train.py"),
        f"train_images.root={tmp_path / 'images'}",
        f"teacher.cache_dir={tmp_path / 'cache'}",  # shared by every run here
        *SMALL_TRAINING,
        "heldout.num_images=0",
        f"trainer.epochs={EPOCHS}",
        "trainer.checkpoint_every=1",
        "trainer.show_progress=false",
        "optim.lr=1e-3",
        "device=cpu",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]


def torchrun(*options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *options]


def start_nodes(tmp_path, run_dir, *overrides) -> list[subprocess.Popen]:
    """Two node launches of the documented recipe: ``--nnodes=2 --node_rank=i``, one rank each,
    node 0's address and a free port as the rendezvous (each in its own process group)."""
    port = free_port()
    env = script_environment(os.environ)
    nodes = []
    for node_rank in (0, 1):
        options = [
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
        ]
        command = torchrun(*options, *training(tmp_path, run_dir, *overrides))
        nodes.append(
            subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=tmp_path,
                start_new_session=True,
            )
        )
    return nodes


def finish(nodes: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    results = []
    for node in nodes:
        try:
            out, err = node.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            out, err = node.communicate()
        results.append((node.returncode, out, err))
    return results


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``): a node's torchrun agent and its ranks."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    return [pid, *(p for child in children for p in process_tree(child))]


def trained_tensors(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "last.safetensors"))


def assert_equal_tensors(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys() and ours
    differing = [name for name in ours if not torch.equal(ours[name], reference[name])]
    assert not differing, differing


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The reference: one node, two ranks (``--standalone --nproc_per_node=2``); it also fills
    the teacher cache the two-node runs then read."""
    tmp_path = tmp_path_factory.mktemp("multinode")
    write_scene_images(tmp_path / "images", count=2, size=(128, 160))
    run_dir = tmp_path / "one_node"
    command = torchrun("--standalone", "--nproc_per_node=2", *training(tmp_path, run_dir))
    env = script_environment(os.environ)
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path, trained_tensors(run_dir)


def test_two_nodes_train_exactly_as_one_node_with_two_ranks(one_node):
    tmp_path, reference = one_node
    run_dir = tmp_path / "two_nodes"
    (code0, out0, err0), (code1, out1, err1) = finish(start_nodes(tmp_path, run_dir))
    assert code0 == 0 and code1 == 0, err0[-2000:] + err1[-2000:]
    assert f"steps {EPOCHS}, images {2 * EPOCHS}" in out0  # rank 0 prints the summary
    assert "steps" not in out1
    # Same ranks, same shards, same two-rank gloo all-reduce: bit for bit the same weights.
    assert_equal_tensors(trained_tensors(run_dir), reference)


def test_a_dead_node_stops_the_run_and_resume_continues_it(one_node):
    tmp_path, reference = one_node
    run_dir = tmp_path / "killed"
    nodes = start_nodes(tmp_path, run_dir)
    checkpoint = run_dir / "checkpoints" / "last.state.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and time.monotonic() < deadline and nodes[0].poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), finish(nodes)[0][2][-3000:]
    # Node 1 dies: its rank and its torchrun agent. (torchrun starts the rank in a session of its
    # own, so killing the agent's process group alone would leave the rank training.)
    for pid in reversed(process_tree(nodes[1].pid)):
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    (code0, out0, err0), _ = finish(nodes, timeout=120)
    stopped_after = time.monotonic() - killed_at
    if code0 == 0:  # node 0 had finished its last step before the kill: nothing to resume
        pytest.skip("the run finished before node 1 was killed")
    assert stopped_after < 60, stopped_after  # gloo sees the reset connection at once
    assert "Connection reset by peer" in err0 or "Connection closed by peer" in err0, err0[-2000:]
    assert not (run_dir / "train_summary.json").exists()

    results = finish(start_nodes(tmp_path, run_dir, f"resume={run_dir}"))
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert_equal_tensors(trained_tensors(run_dir), reference)
