"""Reading one shard: peak memory and records/s of the whole-shard local reader against webdataset streaming.

Writes a passage shard of N records (~1 KB of text each) and one of 10 N, then, each in a fresh process (so the
peak RSS is that reader's alone), reads every record of it with:

* ``load_shard``  - the local reader (the file read whole, the fast ustar parser, all checks before any record);
* ``file://``     - :func:`lancer_dist.data.shards.stream_shard` over ``file://`` (webdataset ``gopen`` + its
                    ``tar_file_iterator``, member by member, checks at the end);
* ``http://``     - the same over a local ``python -m http.server`` on 127.0.0.1 (webdataset's curl pipe).

Prints JSON lines: reader, records, shard MB, seconds, records/s, peak RSS MB and its growth over the baseline of
a process that only imported the modules (the faster of two reads in the same process).

    python benchmarks/bench_shard_read.py [--records 20000] [--out /tmp/bench_shards]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path


def _write(root: Path, n: int) -> None:
    from lancer_dist.data.shards import ShardWriter

    if (root / "manifest.json").exists():
        return
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    with ShardWriter(root, "passages", max_records_per_shard=n) as w:
        for i in range(n):
            w.write(f"en-{i:09d}", {"text": " ".join(rng.choices(words, k=250)), "lang": "en"})


def _child(reader: str, location: str) -> None:
    import webdataset.tariterators  # noqa: F401  (imported by both readers: not part of the timing)

    from lancer_dist.data.shards import load_shard, read_manifest, stream_shard

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    m = read_manifest(location)
    (shard,) = m.shards
    times = []
    for _ in range(2):  # the faster of two reads (the page cache is warm for both readers)
        t0 = time.perf_counter()
        n = 0
        for _ in load_shard(m, shard) if reader == "load_shard" else stream_shard(m, shard):
            n += 1
        times.append(time.perf_counter() - t0)
    dt = min(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "reader": reader, "records": n, "shard_mb": round(shard.num_bytes / 2**20, 1), "seconds": round(dt, 3),
        "records_per_s": round(n / dt), "peak_rss_mb": round(peak, 1), "rss_growth_mb": round(peak - base, 1),
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--out", default="/tmp/bench_shards")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(*a.child)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.servers import FileHttpServer

    out = Path(a.out)
    sizes = [a.records, 10 * a.records]
    for n in sizes:
        _write(out / f"n{n}", n)
    print(json.dumps({"uptime": os.getloadavg(), "sizes": sizes}))
    with FileHttpServer(out, out / "http.log") as srv:
        for n in sizes:
            for reader, loc in [
                ("load_shard", str(out / f"n{n}")),
                ("file://", f"file://{out / f'n{n}'}"),
                ("http://", f"{srv.url}/n{n}"),
            ]:
                subprocess.run([sys.executable, __file__, "--child", reader, loc], check=True)


if __name__ == "__main__":
    main()
