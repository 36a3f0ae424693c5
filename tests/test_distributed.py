"""torchrun with gloo on CPU (issue 14): N processes train, sample and evaluate what one process does.

Tolerance: with the same global batch, each rank draws the same global noise (model.Draw) and takes
its rows; DDP then averages the ranks' half-batch mean gradients, which equals the full batch's mean
up to float32 rounding of the order of 1e-7 relative per step (a different summation order, in the
convolution / matmul reductions and in the average). Adam's normalisation passes that rounding on
to the weights at the scale of lr * 1e-7-ish per step, so after 20 steps we allow 1e-5 absolute on
the EMA weights and 1e-4 relative on the logged loss; a rank drawing other noise or an unsynchronised
gradient is off by 1e-2 or more. Sampling is per-chunk seeded, so it is equal to the bit.
"""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffspace import checkpoint as ckpt
from diffspace.cli import main

TINY = ["--data", "ring8", "--quiet", "model.hidden=32", "model.depth=2", "data.n=400", "train.batch_size=32",
        "log.every=1", "log.n_samples=4", "sample.nfe=4", "log.sample_every=0"]
CONFIGS = {
    "edm-mlp": [],
    "ddpm-vlb-importance": ["model.preset=ddpm", "model.parameterization=eps", "model.objective=vlb", "model.noise=importance"],
    "flow-ot-coupling": ["model.preset=rectified-flow", "model.parameterization=flow", "model.coupling=ot"],
    "class-label-dropout": ["model.class_conditional=true", "model.label_dropout=0.2"],
}


def torchrun(n: int, *args, timeout=300, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "diffspace", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def losses(run):
    with open(run / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def ema(run):
    tensors, state = ckpt.load(ckpt.list_checkpoints(run / "checkpoints")[-1])
    return state["step"], {k: v.double() for k, v in tensors.items() if k.startswith("ema.")}


def assert_same_training(a, b):
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb]
    np.testing.assert_allclose([v for _, v in la], [v for _, v in lb], rtol=1e-4)
    (sa, ea), (sb, eb) = ema(a), ema(b)
    assert sa == sb and ea.keys() == eb.keys()
    worst = max(float((ea[k] - eb[k]).abs().max()) for k in ea)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("name", [n if n in ("edm-mlp", "ddpm-vlb-importance") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in CONFIGS])  # the global OT pairing and label dropout: slow
def test_two_processes_train_what_one_does(tmp_path, name):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train", *TINY, *CONFIGS[name], "--steps", "20", "log.checkpoint_every=10"]
    assert main([*args, "--out", str(one)]) == 0
    r = torchrun(2, *args, "--out", str(two))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained to step 20") == 1  # rank 0 alone reports (and writes)
    assert_same_training(one, two)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == sorted(p.name for p in (one / "checkpoints").iterdir())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_multi_node_form_trains_what_one_process_does(tmp_path):
    """torchrun --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:PORT, two 'machines'
    of one process each on this host: both ranks have LOCAL_RANK 0 (unlike --standalone), so a rank
    taken from LOCAL_RANK where RANK is meant (seeds, the writer, the rows) would show here."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train", *TINY, "--steps", "20", "log.checkpoint_every=10"]
    assert main([*args, "--out", str(one)]) == 0
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                               "--rdzv_id", "multi-node-test", "-m", "diffspace", *args, "--out", str(two)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    outs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert sum(out.count("trained to step 20") for out, _ in outs) == 1  # one writer over both machines
    assert_same_training(one, two)


def test_a_two_process_run_resumes_on_one(tmp_path):
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    args = ["train", *TINY, "log.checkpoint_every=5"]
    assert main([*args, "--steps", "20", "--out", str(straight)]) == 0
    r = torchrun(2, *args, "--steps", "10", "--out", str(moved))
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["train", "--resume", str(moved), "--steps", "20", "--quiet"]) == 0
    assert_same_training(straight, moved)


def test_sample_and_eval_sharded_equal_one_process_to_the_bit(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "5", "--out", str(run)]) == 0
    flags = ["-n", "50", "--sampler", "edm_sde", "--set", "sample.S_churn=10", "--set", "sample.batch=8"]  # 7 chunks
    assert main(["sample", str(run), *flags, "--out", str(tmp_path / "one.png")]) == 0
    r = torchrun(2, "sample", str(run), *flags, "--out", str(tmp_path / "two.png"))
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = np.load(tmp_path / "one.npz")["x"], np.load(tmp_path / "two.npz")["x"]
    assert one.shape == (50, 2) and np.array_equal(one, two)
    # fewer chunks than ranks: a rank with nothing to do still takes part in the gather
    r = torchrun(2, "sample", str(run), "-n", "5", "--out", str(tmp_path / "small.png"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["sample", str(run), "-n", "5", "--out", str(tmp_path / "small1.png")]) == 0
    assert np.array_equal(np.load(tmp_path / "small.npz")["x"], np.load(tmp_path / "small1.npz")["x"])
    r = torchrun(2, "eval", str(run), "-n", "40", "--nll-samples", "0", "--set", "sample.batch=16")
    assert r.returncode == 0, r.stderr[-3000:]
    sharded = (run / "eval.json").read_text()
    assert main(["eval", str(run), "-n", "40", "--nll-samples", "0", "--set", "sample.batch=16"]) == 0
    assert (run / "eval.json").read_text() == sharded


CHUNK_LOGGER = """
import os
import diffspace.evaluate as e

e.NLL_CHUNK = 8
chunk = e._likelihood_chunk


def logged(model, test, k, *args):
    open(LOG, "a").write(f"{os.environ.get('RANK', '-')} {k} {len(test)}\\n")
    return chunk(model, test, k, *args)


e._likelihood_chunk = logged
"""


def test_the_likelihood_of_eval_is_sharded_in_chunks_and_equals_one_process_to_the_bit(tmp_path, monkeypatch):
    """eval's held-out likelihood goes in chunks of evaluate.NLL_CHUNK samples, each with its own seeds,
    shared out across ranks: 3 chunks (of 8, 8 and 4 samples) over 2 processes give the rows of one
    process, bit for bit (the chunk size lowered for the test by a sitecustomize that also logs who does which)."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "data.n=2000", "--steps", "5", "--out", str(run)]) == 0
    log = tmp_path / "chunks.txt"
    (tmp_path / "sitecustomize.py").write_text(CHUNK_LOGGER.replace("LOG", repr(str(log))))  # run by every process below
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    flags = ["-n", "16", "--nll-samples", "20", "--vlb-steps", "0,10"]  # and the adaptive ODE
    r = torchrun(2, "eval", str(run), *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(log.read_text().splitlines()) == ["0 0 8", "0 2 4", "1 1 8"]  # rank r: chunks r, r + 2
    sharded = (run / "eval.json").read_text()
    r = subprocess.run([sys.executable, "-m", "diffspace", "eval", str(run), *flags], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "eval.json").read_text() == sharded and "NLL bound (VLB, 10 steps" in sharded and "solver NFE" in sharded


FEATURES = """
import sys, torch
from diffspace import distributed
from diffspace.features import inception_features
distributed.init(torch.device("cpu"))
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 7))  # a stand-in for Inception
images = torch.rand(23, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
calls = []
net.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
features = inception_features(net, images, batch_size=5)
torch.save((features, calls), f"{sys.argv[1]}.{distributed.rank()}.{distributed.world_size()}")
distributed.close()  # leaving with the group open can abort a rank at exit
"""


def test_the_inception_features_of_fid_are_shared_out_and_equal_one_process_to_the_bit(tmp_path):
    """23 images in batches of 5 over 2 processes: rank 0 runs batches 0, 2, 4, rank 1 batches 1, 3, and
    both get all 23 features, equal to one process's."""
    script, out = tmp_path / "features.py", tmp_path / "f"
    script.write_text(FEATURES)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=120, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                          str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    (alone, calls), (first, calls0), (second, calls1) = (torch.load(f"{out}.{r}") for r in ("0.1", "0.2", "1.2"))
    assert alone.shape == (23, 7) and alone.dtype == torch.float64 and calls == [5, 5, 5, 5, 3]
    assert calls0 == [5, 5, 3] and calls1 == [5, 5]
    assert torch.equal(first, alone) and torch.equal(second, alone)


def test_a_global_batch_the_ranks_cannot_share_is_one_line(tmp_path):
    r = torchrun(2, "train", *TINY, "train.batch_size=15", "--steps", "2", "--out", str(tmp_path / "r"))
    assert r.returncode != 0
    lines = [li for li in r.stderr.splitlines() if "diffspace train: error" in li]
    assert lines and "must be divisible by the number of processes, 2" in lines[0], r.stderr[-2000:]
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr


def test_commands_that_do_not_shard_refuse_torchrun_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["compare", "design-space", "--quick", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "compare runs as one process, not under torchrun" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


HOST_GROUP = """
import torch, torch.distributed as dist
from diffspace import distributed
real = dist.init_process_group
def fake_nccl(backend, **kw):  # no NCCL on this CPU: the GPU group is gloo too, the code path is the CUDA one
    assert backend == "nccl" and kw.pop("device_id") == torch.device("cuda", 0)
    real("gloo", **kw)
dist.init_process_group = fake_nccl
distributed.init(torch.device("cuda", 0))
host = distributed._HOST["group"]
assert host is not None and dist.get_backend(host) == "gloo"
sent = []
real_all_reduce = dist.all_reduce
def spy(t, op=None, group=None):
    sent.append((group is host, t.device.type))
    return real_all_reduce(t, op=op, group=group)
dist.all_reduce = spy
r = distributed.rank()
assert distributed.most(10 * r + 3) == 13
assert distributed.any_rank(r == 1) and not distributed.any_rank(False)
distributed.same_on_all_ranks(7, "a count")
try:
    distributed.same_on_all_ranks(r, "the step")
    raise SystemExit("no error")
except ValueError as e:
    assert "the ranks disagree on the step: from 0 to 1" in str(e)
assert sent == [(True, "cpu")] * 5, sent
distributed.close()
assert distributed._HOST["group"] is None
import os
os.write(1, f"ok{r} ".encode())  # one write each: the ranks share stdout
"""


def test_host_side_agreements_travel_on_a_gloo_group_beside_nccl(tmp_path):
    """Under NCCL the stop flag and counts go over a CPU (gloo) group: on the GPU's group each
    agreement would be a device tensor read back, one host-device synchronisation per step."""
    script = tmp_path / "host.py"
    script.write_text(HOST_GROUP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and sorted(r.stdout.split()) == ["ok0", "ok1"], r.stderr[-3000:]


def _workers(parent: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers with ps --ppid")
def test_a_killed_rank_ends_the_job_without_a_hang_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                            "diffspace", "train", *TINY, "--steps", "1000000", "log.checkpoint_every=20", "--out", str(run)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not ckpt.list_checkpoints(run / "checkpoints") and time.time() < deadline:
            time.sleep(0.2)
        assert ckpt.list_checkpoints(run / "checkpoints"), "no checkpoint within 120 s"
        workers = _workers(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.time()
        _, err = job.communicate(timeout=120)
        assert job.returncode != 0 and time.time() - t0 < 60
    finally:
        if job.poll() is None:
            job.kill()
    assert "lost another process of the job" in err and "[rank0]: Traceback" not in err, err[-3000:]
    step, _ = ema(run)
    assert main(["train", "--resume", str(run), "--steps", str(step + 5), "--quiet"]) == 0
    assert ema(run)[0] == step + 5


@pytest.mark.slow
def test_four_processes_train_what_one_does_and_resume_on_two(tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    args = ["train", *TINY, *CONFIGS["ddpm-vlb-importance"], "log.checkpoint_every=10"]
    assert main([*args, "--steps", "30", "--out", str(one)]) == 0
    r = torchrun(4, *args, "--steps", "20", "--out", str(four))
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(2, "train", "--resume", str(four), "--steps", "30", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_training(one, four)


@pytest.mark.slow
def test_dropout_ranks_draw_their_own_masks_and_resume_exactly(tmp_path):
    """Dropout is the one draw that is per rank: each rank has its own stream (not rank 0's copy), and
    each rank's state is in the checkpoint, so a 2-process run resumed on 2 processes is bit-identical."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["train", *TINY, "model.dropout=0.3", "log.checkpoint_every=5"]
    for out, steps in ((straight, 20), (resumed, 10)):
        r = torchrun(2, *args, "--steps", str(steps), "--out", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
    tensors, _ = ckpt.load(ckpt.list_checkpoints(resumed / "checkpoints")[-1])
    assert not torch.equal(tensors["rng.torch"], tensors["rng.torch.rank1"])
    r = torchrun(2, "train", "--resume", str(resumed), "--steps", "20", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    (sa, ea), (sb, eb) = ema(straight), ema(resumed)
    assert sa == sb == 20 and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert losses(straight) == losses(resumed)
