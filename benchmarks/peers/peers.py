"""The same trivial-task workload on Ray, Dask distributed and Celery (Redis broker).

    benchmarks/peers/.venv/bin/python benchmarks/peers/peers.py --tasks 20000 --round-trips 200

For each system: N no-op tasks on 2 workers, submitted at once (tasks/s from first submit to
last result), then sequential single-task round trips (submit, wait for the result; p50 and
p99). One JSON object per system on stdout, one line each.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def noop(i):
    return i


def quantiles(samples_ms):
    s = sorted(samples_ms)
    pick = lambda q: s[min(len(s) - 1, round((len(s) - 1) * q))]
    return {"p50_ms": pick(0.5), "p99_ms": pick(0.99), "mean_ms": statistics.fmean(s)}


def ray_bench(n, trips):
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    f = ray.remote(noop)
    ray.get([f.remote(i) for i in range(100)])  # warm the workers
    t0 = time.perf_counter()
    ray.get([f.remote(i) for i in range(n)])
    rate = n / (time.perf_counter() - t0)
    lat = []
    for i in range(trips):
        t = time.perf_counter()
        ray.get(f.remote(i))
        lat.append((time.perf_counter() - t) * 1e3)
    ray.shutdown()
    return {"system": "ray " + ray.__version__, "tasks": n, "tasks_per_s": rate, **quantiles(lat)}


def dask_bench(n, trips):
    import dask
    from dask.distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    client.gather(client.map(noop, range(100), pure=False))
    t0 = time.perf_counter()
    client.gather(client.map(noop, range(n), pure=False))
    rate = n / (time.perf_counter() - t0)
    lat = []
    for i in range(trips):
        t = time.perf_counter()
        client.submit(noop, i, pure=False).result()
        lat.append((time.perf_counter() - t) * 1e3)
    client.close()
    cluster.close()
    return {"system": "dask " + dask.__version__, "tasks": n, "tasks_per_s": rate, **quantiles(lat)}


CELERY_APP = """
from celery import Celery
import os
url = os.environ["PEERS_REDIS"]
app = Celery("peers_tasks", broker=url, backend=url)
app.conf.update(worker_prefetch_multiplier=64, result_expires=600, broker_connection_retry_on_startup=True)

@app.task
def noop(i):
    return i
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def celery_bench(n, trips):
    import celery
    work = tempfile.mkdtemp()
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ, PEERS_REDIS=f"redis://127.0.0.1:{port}/0", PYTHONPATH=work)
    with open(os.path.join(work, "peers_tasks.py"), "w") as f:
        f.write(CELERY_APP)
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "peers_tasks", "worker", "-c", "2",
                               "--pool", "prefork", "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
                              cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        os.environ["PEERS_REDIS"] = env["PEERS_REDIS"]
        sys.path.insert(0, work)
        import peers_tasks
        deadline = time.time() + 60
        while True:
            try:
                peers_tasks.noop.delay(0).get(timeout=5)
                break
            except Exception:
                if time.time() > deadline:
                    raise
        t0 = time.perf_counter()
        results = [peers_tasks.noop.delay(i) for i in range(n)]
        for r in results:
            r.get(timeout=600)
        rate = n / (time.perf_counter() - t0)
        lat = []
        for i in range(trips):
            t = time.perf_counter()
            peers_tasks.noop.delay(i).get(timeout=60)
            lat.append((time.perf_counter() - t) * 1e3)
        return {"system": "celery " + celery.__version__ + " + redis", "tasks": n, "tasks_per_s": rate, **quantiles(lat)}
    finally:
        worker.terminate()
        redis.terminate()
        worker.wait(timeout=30)
        redis.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--round-trips", type=int, default=200)
    p.add_argument("--only", choices=["ray", "dask", "celery"], action="append")
    a = p.parse_args()
    if not 1 <= a.tasks <= 1_000_000 or not 1 <= a.round_trips <= 100_000:
        p.error("--tasks must be 1..1000000 and --round-trips 1..100000")
    for name, fn in (("ray", ray_bench), ("dask", dask_bench), ("celery", celery_bench)):
        if a.only and name not in a.only:
            continue
        try:
            print(json.dumps(fn(a.tasks, a.round_trips)), flush=True)
        except Exception as e:  # report and go on with the next system
            print(json.dumps({"system": name, "error": repr(e)}), flush=True)


if __name__ == "__main__":
    main()
