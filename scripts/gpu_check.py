#!/usr/bin/env python3
"""GPU check driver (see scripts/gpu-check.sh). Standard library only.

Env: TS_GPU_WORK (scratch dir; default the first of /tmp/ts-gpu, /var/tmp/ts-gpu and .gpu-work
that is on a disk with room), TS_GPU_GB (size of the generated file,
default 6.5), TS_GPU_BUDGET (seconds, default 330: optional steps are skipped past it),
TS_GPU_HARD (seconds, default 500: a hard end; every step's timeout is cut to what is left, and
the table is printed even when the run is cut short), TS_GPU_DRY=1 (rehearsal on a machine
without a GPU: every tensorstream load goes to --device cpu, GPU-only steps are skipped; checks
the script itself, measures nothing about GPUs), TS_GPU_FAKE=1 (rehearsal against fakecuda, the
CPU stand-in for the CUDA driver in cuda/tests/fakecuda, built by scripts/fakecuda.sh into
TS_GPU_FAKE_LIB, default target/fakecuda: every load goes to cuda:0 through the real GPU code
paths and the device digests are checked, the peers are skipped and no figure is judged),
TS_GPU_QUICK=1 (required steps only: no cold
or warm sweeps beyond three warm configurations, one extra fastsafetensors cold sample, no
--verify row, no tuning sweeps), TS_GPU_ALLOW_STALE=1 (run even when .gpu/ was built from other
sources), TS_GPU_T0 (set by gpu-check.sh: the clock's start).

Order: required steps first (fixtures, digests, cold/warm loads of the default routes, raw-read
baselines, peers), optional tuning sweeps last. The log and results.jsonl are written to $OUT as
they grow, so a run killed from outside still leaves them.
"""
import json, os, re, shutil, signal, subprocess, sys, threading, time

# The clock starts in gpu-check.sh (before the peers' wheels are installed), so that the hard
# limit counts the whole command.
T0 = float(os.environ.get("TS_GPU_T0") or time.time())
G = ".gpu"
TS = os.path.join(G, "bin", "tensorstream")
BENCH = os.path.join(G, "bin", "ts-gpu-bench")
WORK = os.environ.get("TS_GPU_WORK", "/tmp/ts-gpu")
# (Against fakecuda, "device memory" is host memory: a smaller file by default.)
GB = float(os.environ.get("TS_GPU_GB", "0.5" if os.environ.get("TS_GPU_FAKE") == "1" else "6.5"))
BUDGET = float(os.environ.get("TS_GPU_BUDGET", "330"))
HARD = float(os.environ.get("TS_GPU_HARD", "500"))
OUT = os.environ.get("OUT")
FILE = os.path.join(WORK, "model.safetensors")
DRY = os.environ.get("TS_GPU_DRY") == "1"
# A shorter run for a lease's last minutes: the required steps only (fixtures, digests, cold
# and warm timings with raw reads, the peers), without sweeps or extra samples.
QUICK = os.environ.get("TS_GPU_QUICK") == "1"
# A rehearsal against fakecuda (a CPU stand-in for the CUDA driver): the GPU code paths and this
# script's GPU steps run; nothing it times says anything about a GPU.
FAKE = os.environ.get("TS_GPU_FAKE") == "1"
if FAKE:
    if DRY:
        sys.exit("TS_GPU_FAKE=1 and TS_GPU_DRY=1 exclude each other")
    _lib = os.path.abspath(os.environ.get(
        "TS_GPU_FAKE_LIB", os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "fakecuda")))
    if not os.path.exists(os.path.join(_lib, "libcuda.so")):
        sys.exit(f"TS_GPU_FAKE=1: no libcuda.so in {_lib} (run scripts/fakecuda.sh first)")
    os.environ["LD_LIBRARY_PATH"] = _lib + (":" + os.environ["LD_LIBRARY_PATH"]
                                            if os.environ.get("LD_LIBRARY_PATH") else "")
    os.environ.setdefault("FAKECUDA_DELAY_US", "2")
DEV = "cpu" if DRY else "cuda:0"
rows = []        # result dicts for the table
checks = []      # (what, ok, detail)
GPU_HUNG = False  # set when a GPU load timed out: later GPU loads are not started
COLD_OK = True   # False when the work folder lives in memory (tmpfs): "cold" would mean nothing
FINISHED = False


def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    if OUT:
        with open(os.path.join(OUT, "gpu-check.log"), "a") as fh:
            fh.write(s + "\n")


# One peer alone in its own process to cuda:0 (torch's CUDA context created first, as for the
# peers' own timings), warm, or cold with `cold` as third argument (the page cache dropped
# first): its peak RSS (the parent reads it with wait4) and its time to first tensor, which the
# table asks for and the shared peer script, one process for all, cannot give; and the extra
# cold fastsafetensors samples. Prints {"secs", "gbps", "ttft"}.
PEER_ONE = r"""
import os, sys, time, json, torch
torch.zeros(1, device="cuda:0"); torch.cuda.synchronize()
which, path = sys.argv[1], sys.argv[2]
if sys.argv[3:] == ["cold"]:
    os.sync(); open("/proc/sys/vm/drop_caches", "w").write("3")
first = None
def seen():
    global first
    if first is None:
        torch.cuda.synchronize(); first = time.perf_counter() - t
d = {}
if which == "safetensors":
    from safetensors.torch import load_file
    t = time.perf_counter(); d = load_file(path, device="cuda:0"); seen()
elif which == "runai":
    from runai_model_streamer import SafetensorsStreamer
    t = time.perf_counter()
    with SafetensorsStreamer() as s:
        s.stream_file(path)
        for name, ten in s.get_tensors():
            d[name] = ten.to("cuda:0", non_blocking=False); seen()
elif which == "fastsafetensors":
    from fastsafetensors import fastsafe_open
    t = time.perf_counter()
    with fastsafe_open(filenames=[path], nogds=True, device="cuda:0") as f:
        for k in f.keys():
            d[k] = f.get_tensor(k); seen()
elif which == "tensorizer":
    from tensorizer import TensorDeserializer
    path = path + ".tensors"
    t = time.perf_counter()
    with TensorDeserializer(path, device="cuda:0") as de:
        for k, v in de.items():
            d[k] = v; seen()
torch.cuda.synchronize(); el = time.perf_counter() - t
print(json.dumps(dict(secs=el, ttft=first, gbps=os.path.getsize(path) / el / 1e9)))
"""
PEERS_ALONE = ("safetensors", "runai", "fastsafetensors", "tensorizer")


def peer_alone_row(which, out, rss_mib):
    """The row of one PEER_ONE run (its output and the process's peak RSS), or None."""
    r = last_json(out)
    if not r or not r.get("gbps"):
        return None
    return dict(loader=f"peer: {which} (warm, own process)", cold=False, gbps=r["gbps"],
                secs=r.get("secs"), ttft=r.get("ttft"), rss_mib=rss_mib, peer=True)


def peer_rows(res):
    """Rows for the peers' results (peers_baseline.py's RESULTS list), without the serializer's
    timing (writing the .tensors copy). "TensorDeserializer" contains "serialize" too, so the
    name's start is matched. No RSS per peer: they all run in one process, which also loads the
    whole file to host memory to write the tensorizer copy."""
    return [dict(loader="peer: " + r["name"], cold=bool(r.get("cold")) and COLD_OK,
                 gbps=r["gbps"], secs=r["secs"], peer=True)
            for r in res or [] if not r["name"].startswith("tensorizer serialize")]


def peer_results(out):
    """The result lines peers_baseline.py printed, one JSON object per finished timing (its
    closing RESULTS list comes only when it was not cut short, so it is not waited for)."""
    res = []
    for line in out.splitlines():
        r = last_json(line) if line.lstrip().startswith("{") else None
        if r and "name" in r and "gbps" in r:
            res.append(r)
    return res


def add_row(r):
    rows.append(r)
    if OUT:
        with open(os.path.join(OUT, "results.jsonl"), "a") as fh:
            fh.write(json.dumps(r) + "\n")


def left():
    return BUDGET - (time.time() - T0)


def hard_left():
    return HARD - (time.time() - T0)


def cap(timeout):
    """A step's timeout, cut to the time left before the hard end (at least 5 s)."""
    return max(5, min(timeout, int(hard_left()) - 15))


# Process groups of the children running now: a timeout, or the hard limit, kills a child with
# everything it started (the test binaries start CLI processes that hold the GPU).
CHILDREN = set()


def kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def kill_children():
    for pgid in list(CHILDREN):
        kill_group(pgid)


def run(cmd, timeout=300, env=None):
    """Runs cmd; returns (rc, stdout, stderr, wall seconds, peak RSS MiB of the child)."""
    t = time.time()
    timeout = cap(timeout)
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=os.setpgrp)
    except OSError as e:
        return 127, "", str(e), 0.0, None
    CHILDREN.add(p.pid)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p.pid)
        out, err = p.communicate()
        return 124, out, err + f"\n(timed out after {timeout}s)", time.time() - t, None
    finally:
        kill_group(p.pid)  # anything it left behind
        CHILDREN.discard(p.pid)
    # communicate() reaped the child; its rusage is in RUSAGE_CHILDREN only in aggregate, so
    # commands that need their own peak RSS report it themselves (peak_rss_bytes); for others
    # (peers) we run them through run_rss().
    return p.returncode, out, err, time.time() - t, None


def run_rss(cmd, timeout=300):
    """Like run(), but reaps with wait4 to get the child's own peak RSS."""
    t = time.time()
    timeout = cap(timeout)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 1)
        os.dup2(w, 2)
        try:
            os.setpgrp()
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    os.close(w)
    try:
        os.setpgid(pid, pid)  # (the child does it too; whichever comes first, a kill finds it)
    except OSError:
        pass
    CHILDREN.add(pid)
    # A silent child must be killed too: a timer, not a check between output lines.
    killer = threading.Timer(timeout, lambda: kill_group(pid))
    killer.start()
    chunks = []
    try:
        # (Also to $OUT/peers.log: the device tool returns only the end of the output, and the
        # peers' failures and tracebacks come long before it.)
        log = open(os.path.join(OUT, "peers.log"), "a") if OUT else None
        try:
            if log:
                log.write("$ " + " ".join(cmd)[:500] + "\n")
            with os.fdopen(r, "r", errors="replace") as f:
                for line in f:
                    chunks.append(line)
                    print("   | " + line.rstrip(), flush=True)
                    if log:
                        log.write(line)
                        log.flush()
        finally:
            if log:
                log.close()
        _, status, ru = os.wait4(pid, 0)
    finally:
        killer.cancel()
        kill_group(pid)
        CHILDREN.discard(pid)
    rc = os.waitstatus_to_exitcode(status)
    return rc, "".join(chunks), time.time() - t, ru.ru_maxrss / 1024.0


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def drop():
    """Drops the page cache; True only when that worked and the work folder is on a disk."""
    run(["sync"], 60)
    if not COLD_OK:
        return False
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        say("cannot drop the page cache:", e)
        return False


def warm_cache(path):
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def fs_type(path):
    rc, out, _, _, _ = run(["stat", "-f", "-c", "%T", path], 10)
    return out.strip() if rc == 0 else ""


def choose_work():
    """The scratch folder: TS_GPU_WORK when set; else the first of /tmp/ts-gpu, /var/tmp/ts-gpu
    and .gpu-work in the checkout that is on a disk (not tmpfs: cold loads would mean nothing)
    with room for the model and the peers' tensorizer copy."""
    global WORK, FILE
    need = GB * 1e9 * 2.2 + 2e9
    if os.environ.get("TS_GPU_WORK"):
        cands = [WORK]
    else:
        cands = ["/tmp/ts-gpu", "/var/tmp/ts-gpu", os.path.abspath(".gpu-work")]
    for c in cands:
        try:
            os.makedirs(c, exist_ok=True)
        except OSError as e:
            say(f"cannot use {c} as the work folder: {e}")
            continue
        fs, free = fs_type(c), shutil.disk_usage(c).free
        model = os.path.join(c, "model.safetensors")
        if os.path.exists(model):
            free += os.path.getsize(model)  # (an earlier run's file, reused)
        if len(cands) > 1 and (fs in ("tmpfs", "ramfs") or free < need):
            say(f"not {c} for the work folder: {fs}, {free / 1e9:.0f} GB free, "
                f"{need / 1e9:.0f} GB needed")
            continue
        WORK = c
        break
    FILE = os.path.join(WORK, "model.safetensors")
    os.makedirs(WORK, exist_ok=True)
    if shutil.disk_usage(WORK).free < need and not os.path.exists(FILE):
        say(f"WARNING: {WORK} has {shutil.disk_usage(WORK).free / 1e9:.0f} GB free, "
            f"{need / 1e9:.0f} GB needed (model + the peers' tensorizer copy)")


def sources_match():
    """Compares the sources the binaries were built from (.gpu/SOURCES, sha256sum format written
    by prepare-gpu-check.sh) with the files here; (ok, detail)."""
    import hashlib
    listing = os.path.join(G, "SOURCES")
    if not os.path.exists(listing):
        return False, "no .gpu/SOURCES: rerun scripts/prepare-gpu-check.sh"
    changed = []
    n = 0
    for line in open(listing):
        want, _, path = line.rstrip("\n").partition("  ")
        if not path:
            continue
        n += 1
        try:
            got = hashlib.sha256(open(path, "rb").read()).hexdigest()
        except OSError:
            got = None
        if got != want:
            changed.append(path)
    if changed:
        return False, f"{len(changed)} of {n} source files differ from the build: {changed[:5]}"
    return True, f"{n} source files as built"


def check(what, ok, detail=""):
    checks.append((what, ok, detail))
    say(("PASS " if ok else "FAIL ") + what + (": " + detail if detail else ""))


# ---------------------------------------------------------------- loaders
CLI_GPU = None  # decided below


def load_json(cmd, digests, name, timeout):
    """Runs one load command; its JSON result, or None after saying why."""
    global GPU_HUNG
    if digests:
        cmd = cmd + ["--digests"]
    on_gpu = "cuda:0" in cmd
    if on_gpu and GPU_HUNG:
        say("  (not started: an earlier GPU load hung)", " ".join(cmd))
        return None
    if hard_left() < 25:
        say("  (not started: hard time limit)", " ".join(cmd))
        return None
    cut = cap(timeout) < timeout  # the hard limit shortens this step
    rc, out, err, wall, _ = run(cmd, timeout)
    j = last_json(out) if rc == 0 else None
    if rc == 124 and on_gpu and not cut:
        GPU_HUNG = True
        say("GPU load timed out: no further GPU loads are started in this run")
    elif rc == 124:
        say("  (cut by the hard time limit, not hung)")
    if j is None:
        say(f"load failed (rc {rc}): {' '.join(cmd)}\n{err.strip()[-2000:]}")
        return None
    j["_wall"] = wall
    j["_cmd"] = " ".join(cmd)
    if name:
        j["name"] = name
    return j


def ts_load(path, extra=(), digests=False, name=None, timeout=90):
    """tensorstream load --device cuda:0 --json (or ts-gpu-bench load if the CLI cannot)."""
    if CLI_GPU:
        cmd = [TS, "load", path, "--device", DEV, "--json", "--quiet"] + list(extra)
    else:
        cmd = [BENCH, "load", path, "--device", "cuda:0"] + list(extra)
    return load_json(cmd, digests, name, timeout)


def bench_load(path, extra=(), digests=False, name=None, timeout=90):
    if DRY:
        say("  (dry run: skipped ts-gpu-bench load", " ".join(extra) + ")")
        return None
    return load_json([BENCH, "load", path, "--device", "cuda:0"] + list(extra), digests, name, timeout)


def write_sharded(d):
    """A small sharded safetensors checkpoint (u8 tensors, pseudo-random bytes) as transformers
    lays it out; returns name -> sha256 of what was written."""
    import hashlib, random, struct
    os.makedirs(d, exist_ok=True)
    rng = random.Random(7)
    sizes = [[4096, 100, 3 << 20], [7], [(5 << 20) + 1, 1 << 20]]
    want, wmap = {}, {}
    for k, shard in enumerate(sizes):
        fname = f"model-{k + 1:05}-of-{len(sizes):05}.safetensors"
        hdr, off, blobs = {"__metadata__": {"format": "pt"}}, 0, []
        for j, n in enumerate(shard):
            name = f"layers.{k}.w{j}"
            b = rng.randbytes(n)
            hdr[name] = {"dtype": "U8", "shape": [n], "data_offsets": [off, off + n]}
            off += n
            blobs.append(b)
            want[name] = hashlib.sha256(b).hexdigest()
            wmap[name] = fname
        h = json.dumps(hdr).encode()
        h += b" " * (-len(h) % 8)
        with open(os.path.join(d, fname), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(map(sum, sizes))}, "weight_map": wmap}, f)
    return want


def file_digests(path, threads=16):
    """name -> sha256 of each tensor's bytes in a safetensors file, parsed here with the standard
    library (not by tensorstream, so that a parsing mistake shared by the loader and the
    reference cannot pass), hashed on several threads (hashlib releases the GIL)."""
    import hashlib, struct
    from concurrent.futures import ThreadPoolExecutor
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 << 20:
            raise ValueError(f"header of {n} bytes")
        header = json.loads(f.read(n))
    base = 8 + n
    spans = {k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
             for k, v in header.items() if k != "__metadata__"}
    fd = os.open(path, os.O_RDONLY)
    try:
        def one(span):
            h, (a, b) = hashlib.sha256(), span
            while a < b:
                piece = os.pread(fd, min(16 << 20, b - a), a)
                if not piece:
                    raise ValueError(f"file ends at {a}, before {b}")
                h.update(piece)
                a += len(piece)
            return h.hexdigest()
        with ThreadPoolExecutor(threads) as ex:
            return dict(zip(spans, ex.map(one, spans.values())))
    finally:
        os.close(fd)


def digest_map(j):
    """name -> sha256; nested tensorizer names also under the manifest's compact JSON array."""
    out = {}
    for t in (j or {}).get("tensors", []):
        out[t["name"]] = t.get("sha256")
        if t.get("path"):
            out[json.dumps(t["path"], separators=(",", ":"))] = t.get("sha256")
    return out


def record(j, cold, loader, flags=None, confirm=False):
    """A load's row. `flags`: the CLI flags of a warm configuration (so that the fastest can be
    timed again); `confirm`: a row of that second timing, on which the warm target is judged."""
    if not j:
        return
    if j.get("route"):
        loader += f" [{j['route']}]"
    # Rows from the tensorstream CLI are the product and the only ones the targets are judged
    # on; ts-gpu-bench rows (tuning sweeps) are exploration, shown but never judged.
    cli = j.get("_cmd", "").startswith(TS + " ")
    if not cli:
        loader += " (explore)"
    secs, opened = j.get("seconds"), j.get("device_open_seconds") or 0.0
    ctx = min(j.get("device_context_seconds") or 0.0, opened)
    nbytes = j.get("bytes")
    add_row(dict(loader=loader, cold=cold, gbps=j.get("gbps"), secs=secs, flags=flags, confirm=confirm,
                 rss_mib=(j.get("peak_rss_bytes") or 0) / 2**20 or None,
                 ttft=j.get("first_tensor_seconds"), mode=j.get("mode", ""),
                 alloc=j.get("device_alloc_seconds"), io=j.get("io_seconds"),
                 open=j.get("device_open_seconds"), direct_io=j.get("direct_io"), cli=cli,
                 # GB/s counting the device open too (driver, context, pinned ring): what the
                 # peers pay inside their own timings.
                 gbps_open=(nbytes / (secs + opened) / 1e9) if nbytes and secs else None,
                 # The same without the CUDA context's creation: the peers' timings start after
                 # torch created its context, so this is the like-for-like figure.
                 gbps_open_nc=(nbytes / (secs + opened - ctx) / 1e9) if nbytes and secs else None))
    say(f"  {loader:<44} {'cold' if cold else 'warm'} {j.get('gbps', 0):7.2f} GB/s "
        f"{j.get('seconds', 0):7.3f} s  rss {(j.get('peak_rss_bytes') or 0) / 2**20:7.1f} MiB  "
        f"first tensor {j.get('first_tensor_seconds')}"
        # Where the time went: allocating the device memory, and before the data phase
        # (metadata, plan); only the CLI reports them.
        + (f"  alloc {j['device_alloc_seconds'] * 1e3:.1f} ms" if j.get("device_alloc_seconds") is not None else "")
        + (f"  before io {(secs - j['io_seconds']) * 1e3:.1f} ms"
           if secs is not None and j.get("io_seconds") is not None else "")
        + ("  [staging NOT page-locked: driver refused]" if j.get("staging_page_locked") is False else "")
        + (f"  [mapped pieces: {j.get('mapped_pieces_registered')} registered, "
           f"{j.get('mapped_pieces_pread')} pread]" if j.get("route") == "mapped" else ""))


def run_test_suites():
    """The GPU test suites (tests/gpu.rs, cuda/tests/device.rs), built in release by
    prepare-gpu-check.sh: on a GPU every test must run (none skipped) and pass."""
    say("== GPU test suites on cuda:0 (tests/gpu.rs, cuda/tests/device.rs)")
    env = dict(os.environ, TS_FIXTURES=os.path.abspath(os.path.join(G, "fixtures")), RUST_BACKTRACE="1",
               TS_CLI=os.path.abspath(TS))
    for name in ("gpu", "device"):
        exe = os.path.join(G, "bin", "test-" + name)
        if not os.path.exists(exe):
            check(f"GPU test suite {name}", False, "no test binary in .gpu/bin: rebuild .gpu/")
            continue
        rc, out, err, wall, _ = run([exe, "--test-threads", "1", "--nocapture"], 90 if QUICK else 150,
                                    env=env)
        m = re.search(r"test result: \w+\. (\d+) passed; (\d+) failed", out)
        passed, failed = (int(m.group(1)), int(m.group(2))) if m else (0, None)
        skipped = (out + err).count("skipped: no CUDA device")
        detail = f"{passed} passed, {failed} failed, {skipped} skipped for lack of a device ({wall:.1f} s)"
        if rc != 0 or failed:
            say("  " + (out + err).strip()[-3000:].replace("\n", "\n  "))
        if rc == 124:
            # Cut by its timeout: say which test was running, and judge nothing from it.
            running = re.findall(r"^test (\S+) \.\.\.", out, re.M)
            check(f"GPU test suite {name}", False,
                  f"NOT JUDGED: time ran out after {wall:.0f} s"
                  + (f", in {running[-1]}" if running else "") + f"; {passed} passed before")
            continue
        if DRY:
            check(f"GPU test suite {name} (dry run: no device, so skips are expected)",
                  rc == 0 and m is not None and failed == 0, detail)
        else:
            check(f"GPU test suite {name}", rc == 0 and m is not None and failed == 0 and skipped == 0
                  and passed > 0, detail)


def main():
    global CLI_GPU, COLD_OK
    choose_work()
    say("== machine")
    for c in (["nvidia-smi", "--query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current", "--format=csv,noheader"],
              ["uname", "-r"], ["df", "-h", WORK], ["cat", os.path.join(G, "COMMIT")]):
        rc, out, err, _, _ = run(c, 30)
        say(" ".join(c[:1]), "->", (out or err).strip())
    # The CPU and memory topology the warm route runs on (not recorded by any run so far):
    # NUMA nodes and which of them the GPU hangs off, for telling a memory-bandwidth or
    # cross-socket limit of the warm copies from a slow copy.
    rc, out, err, _, _ = run(["lscpu"], 30)
    for line in (out or err).splitlines():
        if line.split(":")[0].strip() in ("Model name", "Socket(s)", "Core(s) per socket",
                                          "Thread(s) per core", "NUMA node(s)", "L3", "L3 cache") \
                or line.startswith("NUMA node"):
            say("lscpu ->", " ".join(line.split()))
    rc, out, err, _, _ = run(["nvidia-smi", "topo", "-m"], 30)
    for line in (out or err).strip().splitlines()[:4]:
        say("nvidia-smi topo ->", " ".join(line.split()))
    ok, detail = sources_match()
    check("binaries built from these sources", ok,
          detail + ("" if ok else " (results below are for other code: rebuild .gpu/)"))
    if not ok and os.environ.get("TS_GPU_ALLOW_STALE") != "1":
        # Minutes of a short lease spent measuring other code help no one: stop now.
        say("stopping: rerun scripts/prepare-gpu-check.sh on the development machine and carry "
            ".gpu again (TS_GPU_ALLOW_STALE=1 runs anyway)")
        return
    fs = fs_type(WORK)
    if fs in ("tmpfs", "ramfs"):
        COLD_OK = False
        say(f"WORK {WORK} is on {fs}: the file lives in memory, so no load is counted as cold "
            "and the cold targets are not judged (set TS_GPU_WORK to a disk)")
    else:
        say(f"WORK {WORK} is on {fs or 'an unknown filesystem'}, "
            f"{shutil.disk_usage(WORK).free / 1e9:.0f} GB free")
    # Whether the page cache can be dropped at all (root, not a sandboxed kernel): said now,
    # not found out after the cold rounds.
    if COLD_OK and not drop():
        COLD_OK = False
        say("the page cache cannot be dropped here: no load is counted as cold and the cold "
            "targets are not judged")

    # ---------------------------------------------------------- (a) fixtures
    say("== (a) fixtures -> cuda:0, device digests vs manifest")
    manifest = json.load(open(os.path.join(G, "fixtures", "manifest.json")))
    mixed = os.path.join(G, "fixtures", "mixed.safetensors")
    rc, out, err, _, _ = run([TS, "load", mixed, "--device", DEV, "--json", "--quiet", "--digests"], 60)
    CLI_GPU = rc == 0 and last_json(out) is not None
    if not CLI_GPU:
        say("tensorstream CLI cannot load to cuda:0 yet -> using ts-gpu-bench load (same crate, "
            "same engine, safetensors only). CLI said:", (err or out).strip()[-500:])
    for fname, info in sorted(manifest["files"].items()):
        path = os.path.join(G, "fixtures", fname)
        if not CLI_GPU and (info.get("format") != "safetensors" or info.get("encryption")):
            check(f"fixture {fname}", False, "not loaded: the CLI has no GPU path and ts-gpu-bench reads plain safetensors only")
            continue
        variants = [("", []), (" --gpu-warm force", ["--gpu-warm", "force"])]
        enc = info.get("encryption") or {}
        flags = []
        if enc.get("key_hex"):
            kf = os.path.join(WORK, fname + ".key")
            open(kf, "w").write(enc["key_hex"] + "\n")
            flags = ["--key-file", kf]
        elif enc.get("password"):
            pf = os.path.join(WORK, fname + ".password")
            open(pf, "w").write(enc["password"])
            flags = ["--password-file", pf]
        if info.get("format") == "tensorizer":
            # Encrypted files need the key; every tensorizer file also loads with --verify (the
            # staged path: checked on the host, then copied to the device).
            variants = ([("", flags)] if flags else [("", [])]) + [(" --verify", flags + ["--verify"])]
        for label, extra in variants:
            j = ts_load(path, extra, digests=True, timeout=60)
            got = digest_map(j)
            want = {t["name"]: t["sha256"] for t in info["tensors"]}
            bad = [n for n in want if got.get(n) != want[n]]
            check(f"fixture {fname}{label}", j is not None and not bad,
                  f"{len(want) - len(bad)}/{len(want)} tensors match" + (f", differ: {bad[:5]}" if bad else ""))

    # A sharded checkpoint (model.safetensors.index.json + 3 shards, written here): every
    # tensor's device bytes against the bytes written.
    if CLI_GPU:
        sdir = os.path.join(WORK, "sharded")
        want = write_sharded(sdir)
        j = ts_load(sdir, digests=True, timeout=60)
        got = digest_map(j)
        bad = [n for n in want if got.get(n) != want[n]]
        check("sharded checkpoint (3 shards) -> cuda:0, device bytes == written bytes",
              j is not None and not bad and len(got) == len(want),
              f"{len(want) - len(bad)}/{len(want)} tensors match" + (f", differ: {bad[:5]}" if bad else ""))
    else:
        check("sharded checkpoint (3 shards) -> cuda:0", False,
              "not run: the CLI cannot load to cuda:0 (see above)")

    # The GPU test suites belong to step (a): run now, on time of their own, not on what the
    # timings leave.
    run_test_suites()

    # ---------------------------------------------------------- (b) big file
    say(f"== (b) generated {GB} GB bf16 model -> cuda:0, device digests vs CPU digests")
    if not (os.path.exists(FILE) and os.path.getsize(FILE) >= GB * 1e9 * 0.95):
        rc, out, err, wall, _ = run([BENCH, "gen", FILE, "--gb", str(GB)], 240)
        say((out or err).strip()[-400:], f"({wall:.1f} s)")
        if rc != 0:
            check("generate model file", False, err.strip()[-300:])
            return
    size = os.path.getsize(FILE)
    t = time.time()
    try:
        cpu = file_digests(FILE)
    except (OSError, ValueError) as e:
        say("cannot hash the file's tensors:", e)
        cpu = {}
    say(f"CPU digests of {len(cpu)} tensors in {time.time() - t:.1f} s (Python's own parse of "
        "the safetensors header, independent of tensorstream's)")
    # Cold, so that the bytes checked are the ones O_DIRECT reads put on the device.

    def check_digests(j, what, note=""):
        """Every tensor of the big file as loaded (j: a --digests run) against the CPU digests."""
        bad = [n for n in cpu if digest_map(j).get(n) != cpu[n]]
        check(f"{size / 1e9:.1f} GB file, device bytes == file bytes ({what})", j is not None and cpu and not bad,
              f"{len(cpu) - len(bad)}/{len(cpu)} match" + note)

    c = drop()
    j = ts_load(FILE, digests=True, name="tensorstream (digests run)")
    how = "O_DIRECT reads" if j and j.get("direct_io") else ("page cache" if not c else "buffered reads")
    check_digests(j, f"ring path, {how}")
    if not DRY and not QUICK:
        j = bench_load(FILE, ["--warm", "register"], digests=True)
        check_digests(j, "mapped register path", f"; {j and j.get('mode')}")

    # The pinned host->device ceiling of this machine (a few seconds), for the warm target;
    # and the same with the copies the ring makes (4 MiB from 40 slots, 1 MiB from 64): what
    # the copy engine gives when each copy is small.
    if not DRY and not GPU_HUNG:
        shapes = [["--mib", "8192"]] + ([] if QUICK else [["--mib", "4096", "--chunk-mib", "4", "--slots", "40"],
                                                          ["--mib", "2048", "--chunk-mib", "1", "--slots", "64"]])
        for shape in shapes:
            rc, out, err, _, _ = run([BENCH, "h2d"] + shape, 60)
            for line in out.splitlines():
                r = last_json(line)
                if r:
                    add_row(dict(loader=r["name"], cold=False, gbps=r["gbps"]))
                    say(f"  {r['name']}: {r['gbps']:.2f} GB/s")
            if rc != 0:
                say(f"  h2d {' '.join(shape)} failed (rc {rc}): {(err or out).strip()[-200:]}")

    # ---------------------------------------------------------- (c) timings
    say("== (c) cold and warm loads (same file, same run)")
    # Cold: raw O_DIRECT reads and tensorstream loads interleaved, three rounds, each after a
    # cache drop, so drift of the disk (or a neighbour) hits both alike; judged on medians.
    for rnd in range(3):
        # Two shapes: tensorstream's own (16 reads of 8 MiB in flight) and a deeper one; dd
        # (one read at a time) in the first round only. About 10 cold passes over the file in
        # all, ~65 s on a 1 GB/s disk, inside the budget.
        # (And 32 x 1 MiB: small reads, as tensorstream's cold GPU loads make by default. The
        # quick mode leaves out 16 x 8 MiB, never the fastest so far.)
        for threads, mib in ((32, 16), (32, 1)) if QUICK else ((16, 8), (32, 16), (32, 1)):
            if not drop():
                break
            rc, out, err, _, _ = run([BENCH, "raw-read", FILE, "--threads", str(threads),
                                      "--chunk-mib", str(mib)], 120)
            r = last_json(out)
            if r and COLD_OK:
                add_row(dict(loader=f"raw O_DIRECT read {threads} thr x {mib} MiB", cold=True,
                             gbps=r["gbps"], secs=r["secs"], raw=True))
                say(f"  round {rnd}: raw O_DIRECT read ({threads} threads x {mib} MiB): {r['gbps']:.2f} GB/s")
        if rnd == 0 and drop():
            t = time.time()
            rc, _, err, _, _ = run(["dd", f"if={FILE}", "of=/dev/null", "bs=16M", "iflag=direct", "status=none"], 120)
            if rc == 0:
                dd = size / (time.time() - t) / 1e9
                add_row(dict(loader="raw dd iflag=direct bs=16M", cold=True, gbps=dd, raw=True))
                say(f"  round {rnd}: dd iflag=direct: {dd:.2f} GB/s")
            else:
                say(f"  dd iflag=direct failed (rc {rc}): {err.strip()[-300:]}")
        c = drop()
        record(ts_load(FILE), c, "tensorstream (ring)")
        if rnd < 2:
            # The read size before 2026-11-27 (4 MiB, whole slots) against the 1 MiB default
            # of cold GPU loads: shown, not judged.
            c = drop()
            record(ts_load(FILE, ["--chunk-size", "4MiB"]), c, "tensorstream --chunk-size 4MiB (cold sweep)")
    c = drop()
    record(ts_load(FILE, ["--gpu-warm", "auto"]), c, "tensorstream --gpu-warm auto")
    # Cold, second part: more cold samples of the default and of fastsafetensors (the fastest
    # cold peer of the first GPU run, one sample there), interleaved, so that the peer
    # comparison rests on medians of both sides; and smaller reads as sweep rows, not judged.
    # (A quick run takes one such round, without the sweep rows: the peer comparison then
    # rests on two fastsafetensors samples rather than one.)
    for rnd in range(1 if QUICK else 2):
        if not COLD_OK or hard_left() < (150 if QUICK else 300):
            say("  (skipping cold round", rnd + 3, "- budget)" if COLD_OK else "- nothing is cold here)")
            break
        # (16 x 8 MiB and 16 x 16 MiB slots were swept here on 2026-11-27: 1.79-1.80, no better
        # than the defaults.) fastsafetensors reads 512 KiB blocks on 16 threads: small reads.
        sweeps = [] if QUICK else (
            [["--chunk-size", "512KiB", "--concurrency", "16"]] + ([["--chunk-size", "2MiB"]] if rnd == 0 else []))
        for extra in sweeps:
            c = drop()
            record(ts_load(FILE, extra), c, "tensorstream " + " ".join(extra) + " (cold sweep)")
        if not DRY and not FAKE and not GPU_HUNG:
            rc, out, err, wall, _ = run(["python3", "-c", PEER_ONE, "fastsafetensors", FILE, "cold"], 90)
            r = last_json(out)
            if r:
                add_row(dict(loader="peer: fastsafetensors nogds", cold=True, gbps=r["gbps"],
                             secs=r["secs"], peer=True))
                say(f"  fastsafetensors nogds (cold, own process): {r['gbps']:.2f} GB/s")
            else:
                say(f"  fastsafetensors cold sample failed (rc {rc}): {(err or out).strip()[-300:]}")
        c = drop()
        record(ts_load(FILE), c, "tensorstream (ring)")
    warm_cache(FILE)
    for i in range(3):
        record(ts_load(FILE), False, "tensorstream (ring)", flags=[])
        # The staging ring on transparent huge pages (2 MiB), interleaved with the default's
        # small pages: whether the CPU's copies into the slots get faster with fewer TLB misses.
        j = ts_load(FILE, ["--gpu-huge-pages", "on"])
        record(j, False, "tensorstream --gpu-huge-pages on", flags=["--gpu-huge-pages", "on"])
        if i == 0 and j:
            say(f"  (staging ring on huge pages: {j.get('staging_huge_page_bytes')} bytes)")
    # The default route's device bytes when the file is in the page cache (pread threads into
    # the pinned slots; the digest run above read with O_DIRECT).
    j = ts_load(FILE, digests=True, name="tensorstream warm (digests run)")
    check_digests(j, f"warm, default route {j and j.get('route')}, "
                     f"{'O_DIRECT' if j and j.get('direct_io') else 'buffered'} reads, "
                     f"queue depth {j and j.get('queue_depth')}")
    for i in range(2):
        record(ts_load(FILE, ["--gpu-warm", "auto"]), False, "tensorstream --gpu-warm auto",
               flags=["--gpu-warm", "auto"])
    # The peers now, before the tuning rows: the targets need them, the sweeps are extra.
    say("== peers_baseline.py on the same file")
    peers_rss = None
    if DRY or FAKE:
        say("peers skipped: " + ("dry run (they load to cuda:0)" if DRY else "fake driver (they need torch on a GPU)"))
    elif hard_left() > 60 and shutil.which("python3"):
        # CUDA is initialised before the peer script runs (its first timing would otherwise
        # include torch's context creation); the script itself is run unchanged.
        boot = ("import runpy, sys, torch; torch.zeros(1, device='cuda:0'); torch.cuda.synchronize(); "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
        rc, out, wall, peers_rss = run_rss(["python3", "-c", boot, os.path.join(G, "peers_baseline.py"), FILE],
                                           timeout=max(45, int(hard_left()) - 45))
        # Each result line as the script printed it (its closing RESULTS list comes only if
        # it was not cut short): a peer killed by the time limit keeps the rows it finished.
        for r in peer_rows(peer_results(out)):
            add_row(r)
        say(f"peers done in {wall:.0f} s (rc {rc}); peak RSS of that one process {peers_rss:.0f} MiB")
    else:
        say("peers skipped: budget")
    # Each peer alone, warm (not in a quick run): its peak RSS and time to first tensor for
    # the table. Shown, never judged.
    if not (DRY or FAKE or QUICK or GPU_HUNG):
        warm_cache(FILE)
        if os.path.exists(FILE + ".tensors"):
            warm_cache(FILE + ".tensors")
        for which in PEERS_ALONE:
            # (Before the warm sweep, which only explores: the table needs these, ~6 s each.)
            if hard_left() < 120:
                say(f"  (skipping {which} alone - budget)")
                continue
            rc, out, wall, rss = run_rss(["python3", "-c", PEER_ONE, which, FILE], 45)
            row = peer_alone_row(which, out, rss)
            if row:
                add_row(row)
                say(f"  {which} alone, warm: {row['gbps']:.2f} GB/s, first tensor "
                    f"{row['ttft'] if row['ttft'] is None else round(row['ttft'], 3)} s, "
                    f"peak RSS {rss:.0f} MiB")
            else:
                say(f"  {which} alone failed (rc {rc}): {out.strip()[-300:]}")
    # (The peers dropped the cache and wrote a copy of the file: warm it again for what follows.)
    warm_cache(FILE)
    # The warm path's CPU side alone (no GPU): 16 or 32 threads filling a 40 x 4 MiB ring from
    # the page cache, with pread or with non-temporal copies out of the mapping. Tells whether
    # the CPU copy is the warm limit here, and which copy is faster on this machine's CPU.
    if not QUICK:
        for rnd in range(2):
            for threads in (16, 32):
                for mode in ("pread", "map"):
                    rc, out, err, _, _ = run([BENCH, "copy-rate", FILE, "--threads", str(threads),
                                              "--mode", mode], 60)
                    r = last_json(out)
                    if r:
                        add_row(dict(loader="diag: " + r.get("name", "copy-rate"), cold=False,
                                     gbps=r["gbps"], secs=r["secs"],
                                     rss_mib=(r.get("peak_rss_bytes") or 0) / 2**20 or None))
                        if rnd == 0:
                            say(f"  {r.get('name')}: {r['gbps']:.2f} GB/s (CPU only)")
                    else:
                        say(f"  copy-rate {mode} {threads} failed (rc {rc}): {(err or out).strip()[-200:]}")
    # Copying out of the mapping with non-temporal stores (no read of each slot line before
    # it is written; the kernel copies nothing), against the same route with pread: the device
    # bytes first.
    map_copy = ["--gpu-warm", "force", "--gpu-warm-threads", "0", "--gpu-warm-pread-threads", "16",
                "--gpu-warm-copy", "map"]
    if not QUICK:
        j = ts_load(FILE, map_copy, digests=True, name="tensorstream warm map copy (digests run)")
        check_digests(j, f"warm, 16 threads copying out of the mapping: route {j and j.get('route')}")
    # Warm knobs, through the CLI so that a better setting is a judged row. The first run on
    # a GPU (2026-11-27, H200) found pread copies memcpy-bound near 26-29 GB/s and registration
    # of mapped pieces slower still (14-23 GB/s): so more pread threads in the ring (smaller
    # slots, same pinned bytes), and the mapped route with registering and pread threads side
    # by side taking pieces from one queue (registered pieces pinned in the resident memory:
    # threads x 2 x piece).
    # Spare slots: with one slot per reader, a pread thread that finished waits for its slot to
    # come back from the copy engine before its next read; the default since 2026-11-27 has 40
    # slots for 32 reads in flight, so it starts at once. --slots 32 is the default before
    # (32 slots, 32 in flight); 48 x 3 MiB keeps 32 in flight with more spare slots.
    # Small rings: 40 or 64 slots of 1 MiB (40 / 64 MiB, 32 reads in flight) may stay in the
    # CPU's last-level cache between the CPU's copy into a slot and the copy engine's read of
    # it, so that the copies stop paying a trip to memory each way (8 pread threads reached
    # 22-26 GB/s together where one alone reads 9 GB/s: the threads share a limit).
    # (The first three also run in a quick run.) --streams 4: more copy streams for the many
    # 4 MiB copies (one or two streams reached the same ceiling with 16-64 MiB copies).
    sweep = (["--slots", "32"],
             map_copy,
             ["--slots", "40", "--slot-size", "1MiB"],
             ["--gpu-warm", "force", "--gpu-warm-threads", "0", "--gpu-warm-pread-threads", "16"],
             ["--slots", "48", "--slot-size", "3MiB"],
             ["--slots", "64", "--slot-size", "1MiB"],
             ["--streams", "4"],
             # More readers than the default 32 (8 gave 22-26 GB/s, 16 33-35, 32 38-40): 56
             # pread threads on 64 slots of 2 MiB (the same 128 MiB of pinned memory as before).
             ["--slots", "64", "--slot-size", "2MiB", "--concurrency", "56"],
             ["--slots", "8", "--slot-size", "16MiB"],  # the defaults before 2026-11-27
             ["--gpu-warm", "force", "--gpu-warm-threads", "0", "--gpu-warm-pread-threads", "20",
              "--gpu-warm-copy", "map"],
             ["--slots", "64", "--slot-size", "2MiB"],
             ["--slots", "16", "--slot-size", "8MiB"],
             ["--gpu-warm", "force", "--gpu-warm-threads", "2", "--gpu-warm-pread-threads", "15"],
             ["--gpu-warm", "force", "--gpu-warm-piece", "64MiB"],
                  ["--gpu-warm", "force", "--gpu-warm-threads", "2", "--gpu-warm-pread-threads", "7",
                   "--slots", "16", "--slot-size", "8MiB"],
                  ["--gpu-warm", "force", "--gpu-warm-threads", "1", "--gpu-warm-pread-threads", "7",
                   "--slots", "16", "--slot-size", "8MiB"],
                  ["--gpu-warm", "force", "--gpu-warm-threads", "2", "--gpu-warm-piece", "32MiB",
                   "--gpu-warm-pread-threads", "7", "--slots", "16", "--slot-size", "8MiB"],
                  ["--gpu-warm", "force", "--gpu-warm-threads", "3", "--gpu-warm-pread-threads", "10",
                   "--slots", "24", "--slot-size", "8MiB"],
                  ["--gpu-warm", "force", "--gpu-warm-threads", "2", "--gpu-warm-pread-threads", "12",
                   "--slots", "32", "--slot-size", "4MiB"])
    for extra in (sweep[:3] if QUICK else sweep):
        if hard_left() < 90:  # room for the confirmation of the fastest below
            say("  (skipping", " ".join(extra), "- budget)")
            continue
        label = "tensorstream " + " ".join(extra)
        for i in range(2):
            record(ts_load(FILE, extra), False, label, flags=list(extra))
    # The fastest warm configuration (as the verdict picks it) timed three times more: the warm
    # target is judged on these fresh samples, not on the luckiest pair of about twenty.
    pick = warm_pick()
    if pick and pick.get("flags") is not None and not DRY and not FAKE and hard_left() > 40:
        say(f"  confirming the fastest warm configuration: {pick['loader']} "
            f"(median {pick['gbps']:.2f} GB/s of {pick['n']})")
        for i in range(3):
            record(ts_load(FILE, pick["flags"]), False, pick["base"], flags=pick["flags"], confirm=True)
    # The mapped route with registering and pread threads side by side: its device bytes.
    mixed = ["--gpu-warm", "force", "--gpu-warm-threads", "2", "--gpu-warm-pread-threads", "7",
             "--slots", "16", "--slot-size", "8MiB"]
    if not QUICK:
        j = ts_load(FILE, mixed, digests=True, name="tensorstream warm mixed (digests run)")
        check_digests(j, f"warm, 2 registering + 7 pread threads: route {j and j.get('route')}, pieces "
                         f"{j and j.get('mapped_pieces_registered')} registered / "
                         f"{j and j.get('mapped_pieces_pread')} pread")
    # The warm auto route's device bytes too (the mapped route when the file is resident).
    j = ts_load(FILE, ["--gpu-warm", "auto"], digests=True, name="tensorstream warm auto (digests run)")
    check_digests(j, f"warm, --gpu-warm auto: route {j and j.get('route')}")

    # The same weights in tensorizer's own format (written by the peer script): tensorstream on
    # the very file tensorizer's deserializer read, plain and verified (staged route).
    tz = FILE + ".tensors"
    if (DRY or FAKE) and not os.path.exists(tz):
        run([TS, "convert", FILE, tz], 120)  # rehearse the step without the peers
    if os.path.exists(tz) and left() > 45:
        say("== tensorstream on the tensorizer file the peers wrote")
        c = drop()
        record(ts_load(tz), c, "tensorstream on .tensors")
        warm_cache(tz)
        record(ts_load(tz), False, "tensorstream on .tensors")
        if not QUICK:
            record(ts_load(tz, ["--verify"]), False, "tensorstream on .tensors --verify")
    try:
        os.remove(tz)
    except OSError:
        pass
    # ---------------------------------------------------------- optional: tuning sweeps
    if QUICK:
        return
    say("== optional: tuning sweeps (skipped when time runs short)")
    # Diagnostic: the ring's read side alone (engine + staging slots, no copies), to tell a slow
    # disk read from a slow copy when tuning.
    if left() > 60:
        c = drop()
        rc, out, err, _, _ = run([BENCH, "ring-read", FILE, "--slots", "32", "--slot-size", "4"], 120)
        r = last_json(out)
        if r:
            add_row(dict(loader="diag: ring read side only (" + r.get("name", "?") + ")", cold=c,
                         gbps=r["gbps"], secs=r["secs"]))
            say(f"  ring read side only: {r['gbps']:.2f} GB/s")
    warm_cache(FILE)
    # (The first GPU run also swept mapped+register with 4/8 threads and 16/256 MiB pieces here:
    # 14-23 GB/s, 3.8 GB resident with 256 MiB pieces; not repeated.)
    for extra, label in ((["--warm", "pread", "--warm-threads", "8", "--slots", "16"], "tensorstream mapped pread 8 thr"),
                         (["--warm", "pread", "--warm-threads", "12", "--slots", "24", "--slot-size", "8"],
                          "tensorstream mapped pread 12 thr 8M")):
        if left() < 40:
            say("  (skipping", label, "- budget)")
            continue
        for i in range(2):
            record(bench_load(FILE, extra), False, label)



def med(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def median_row(pred):
    """The median GB/s of the matching rows (as a row dict with n), or None."""
    c = [r["gbps"] for r in rows if pred(r) and r.get("gbps")]
    return {"gbps": med(c), "n": len(c)} if c else None


def best(pred):
    c = [r for r in rows if pred(r) and r.get("gbps")]
    return max(c, key=lambda r: r["gbps"]) if c else None


def is_main(r):
    """Rows the targets are judged on: the tensorstream CLI (the product) on the safetensors
    file (ts-gpu-bench rows are exploration)."""
    return r.get("cli") and r["loader"].startswith("tensorstream") and ".tensors" not in r["loader"]


def warm_confs(confirm=False):
    """Warm configurations: label -> {loader, v (GB/s samples), rss (max MiB), flags, base}."""
    confs = {}
    for r in rows:
        if is_main(r) and not r["cold"] and r.get("gbps") and bool(r.get("confirm")) == confirm:
            c = confs.setdefault(r["loader"], {"loader": r["loader"], "v": [], "rss": 0,
                                               "flags": r.get("flags"),
                                               "base": r["loader"].split(" [")[0]})
            if c["flags"] is None:  # (rows of cold rounds that were not cold carry none)
                c["flags"] = r.get("flags")
            c["v"].append(r["gbps"])
            c["rss"] = max(c["rss"], r.get("rss_mib") or 1e9)
    for c in confs.values():
        c.update(gbps=med(c["v"]), n=len(c["v"]), best=max(c["v"]))
    return confs


def warm_pick():
    """The warm configuration judged: per configuration, the median of its warm loads; the
    fastest that also keeps its peak RSS within 300 MiB and reaches 40 GB/s, if one does (both
    targets met by one configuration); else the fastest, whose RSS is then judged too."""
    confs = warm_confs()
    ok_confs = [c for c in confs.values() if c["gbps"] >= 40 and c["rss"] <= 300]
    return max(ok_confs or confs.values(), key=lambda c: c["gbps"], default=None)


def finish():
    global FINISHED
    if FINISHED:
        return
    FINISHED = True
    say("== targets")
    # Targets are judged on the safetensors file the raw reads and most peers read.
    # Only CLI rows (the product) count; ts-gpu-bench rows are exploration.
    main = is_main
    # The default route's rows ("[host]" in a dry run, where loads go to host memory).
    ring = lambda r: ("[ring]" in r["loader"] or (DRY and r["loader"].startswith("tensorstream (ring)"))) \
        and "sweep" not in r["loader"]
    ts_cold = median_row(lambda r: main(r) and r["cold"] and ring(r))
    # The warm result judged: the configuration `warm_pick` chooses from the sweep, on the
    # samples it was timed again with when there are any (rows marked confirm), so that the
    # choice and the verdict do not rest on the same lucky samples.
    ts_warm = warm_pick()
    confirmed = warm_confs(confirm=True)
    if confirmed:
        c = max(confirmed.values(), key=lambda c: c["n"])
        ts_warm = dict(c, shown=c["loader"] + " timed again"
                       + (f", sweep median {ts_warm['gbps']:.2f} of {ts_warm['n']}" if ts_warm else ""))
    raws = {}
    for r in rows:
        # The judged raw reads are the deep-queue O_DIRECT ones (several samples each); dd (one
        # read at a time, one sample) is shown in the table only.
        if r.get("raw") and r.get("gbps") and "O_DIRECT read" in r["loader"]:
            raws.setdefault(r["loader"], []).append(r["gbps"])
    raw = max(({"loader": k, "gbps": med(v), "n": len(v)} for k, v in raws.items()),
              key=lambda r: r["gbps"], default=None)
    # Each peer's cold result is the median of its cold samples (fastsafetensors has several,
    # interleaved with tensorstream's); the fastest peer by that median is the one to beat.
    peer_meds = {}
    for r in rows:
        if r.get("peer") and r["cold"] and r.get("gbps"):
            peer_meds.setdefault(r["loader"], []).append(r["gbps"])
    peers_cold = max(({"loader": k, "gbps": med(v), "n": len(v), "max": max(v)} for k, v in peer_meds.items()),
                     key=lambda r: r["gbps"], default=None)
    expected_peers = ("safetensors", "runai", "fastsafetensors", "tensorizer")
    missing_peers = [p for p in expected_peers
                     if not any(r.get("peer") and r["cold"] and r["loader"].startswith("peer: " + p) for r in rows)]
    if DRY:
        say("dry run: loads went to host memory, so the GPU targets (warm GB/s, peak RSS, peers) "
            "are not judged; only the fixture and digest checks and the cold ratio are")
        ts_warm = None
    if FAKE:
        say("FAKE DRIVER run: the CUDA driver was fakecuda, a CPU stand-in, so no figure says "
            "anything about a GPU and no speed or memory target is judged; only the fixture and "
            "digest checks and the GPU test suites count")
        ts_warm = ts_cold = None
    # A target whose rows are missing is a FAIL that says so: never silently left out.
    nj = lambda what, why: check(what, False, "NOT JUDGED: " + why)
    if ts_warm:
        check("warm -> GPU >= 40 GB/s", ts_warm["gbps"] >= 40,
              f"median {ts_warm['gbps']:.2f} GB/s of {ts_warm['n']} loads, best {ts_warm['best']:.2f} "
              f"({ts_warm.get('shown', ts_warm['loader'])}; flags {' '.join(ts_warm.get('flags') or []) or 'defaults'})")
        # The same loads counting the device's opening but the CUDA context's creation (the
        # pinned ring's allocation, the streams), as a peer's own timing counts its allocations:
        # shown, not judged (a server opens the device once for many loads).
        warm_open = [r.get("gbps_open_nc") for r in rows
                     if main(r) and not r["cold"] and ring(r) and r.get("gbps_open_nc")]
        if warm_open:
            say(f"NOTE: warm ring loads counting the device's opening but the context's creation "
                f"(pinned ring, streams): median {med(warm_open):.2f} GB/s of {len(warm_open)}")
    elif not DRY and not FAKE:
        nj("warm -> GPU >= 40 GB/s", "no warm tensorstream load finished")
    if FAKE:
        pass
    elif not COLD_OK:
        nj("cold >= 0.95 x best raw read", "nothing is cold here (the work folder is in memory, "
           "or the page cache cannot be dropped: see the start of the log)")
    elif ts_cold and raw:
        check("cold >= 0.95 x best raw read", ts_cold["gbps"] >= 0.95 * raw["gbps"],
              f"median {ts_cold['gbps']:.2f} of {ts_cold['n']} loads vs median {raw['gbps']:.2f} GB/s "
              f"of {raw['n']} ({raw['loader']}), interleaved")
        # Cold means the bytes came from the disk: O_DIRECT reads bypass the page cache.
        cold_rows = [r for r in rows if main(r) and r["cold"] and ring(r)]
        check("cold loads read with O_DIRECT (page cache bypassed)",
              bool(cold_rows) and all(r.get("direct_io") for r in cold_rows),
              f"{sum(1 for r in cold_rows if r.get('direct_io'))}/{len(cold_rows)} loads")
        if ts_cold["gbps"] > 1.05 * raw["gbps"]:
            say(f"NOTE: cold loads ran at {ts_cold['gbps'] / raw['gbps']:.2f} x the best raw read: the "
                "raw reader (threads of pread) is not the fastest way to read this disk, so the 0.95 x "
                "target is easier than it looks")
    else:
        nj("cold >= 0.95 x best raw read",
           "no " + " and no ".join(w for w, v in (("cold tensorstream load", ts_cold), ("raw read", raw)) if not v)
           + " (page cache not droppable?)")
    if DRY or FAKE:
        pass
    elif ts_cold and peers_cold:
        # Counting tensorstream's device open (context, pinned ring) in its time, as the peers
        # pay their allocations inside theirs; slowest of the cold ring loads vs the fastest peer.
        # Like for like: the peers' timings start after torch created its CUDA context, and
        # include their own allocations; tensorstream's count its device open (streams, pinned
        # staging) without the context's creation.
        cold_ts = [r for r in rows if main(r) and r["cold"] and ring(r)]
        # (Rows without the context's time count the whole device open: the slower figure.)
        opened = [r.get("gbps_open_nc") or r["gbps_open"] for r in cold_ts
                  if r.get("gbps_open_nc") or r.get("gbps_open")]
        full = [r["gbps_open"] for r in cold_ts if r.get("gbps_open")]
        ours = med(opened) if opened else ts_cold["gbps"]
        what = "cold faster than every peer (device open included, context creation not, as for the peers)"
        detail = (f"median {ours:.2f} of {len(opened)} cold loads vs median {peers_cold['gbps']:.2f} of "
                  f"{peers_cold['n']} ({peers_cold['loader']})")
        if missing_peers and ours > peers_cold["gbps"]:
            # A peer that did not run may be the fastest: beating the others is not beating it.
            nj(what, detail + "; but no cold result from " + ", ".join(missing_peers))
        else:
            check(what, ours > peers_cold["gbps"], detail)
        if full:
            say(f"NOTE: counting the CUDA context's creation too (which the peers' timings leave out): "
                f"median {med(full):.2f}, slowest {min(full):.2f} GB/s; fastest sample of that peer "
                f"{peers_cold['max']:.2f} GB/s")
        if missing_peers:
            nj("every peer ran", "missing: " + ", ".join(missing_peers) + " (see peers.log)")
    else:
        nj("cold faster than every peer", "no cold tensorstream load" if not ts_cold else "no cold peer result")
    # The default (ring) route; the mapped rows' RSS counts page-cache pages of the file mapped
    # while their pieces are registered, the staged (--verify) rows hold two host groups (shown
    # in the table, not judged).
    # Judged on the ring route and on whatever configuration the warm result came from, so that
    # speed and memory are met by the same configuration.
    judged = {"tensorstream (ring) [ring]"} | ({ts_warm["loader"]} if ts_warm else set())
    rss = [r["rss_mib"] for r in rows if main(r) and r["loader"] in judged and r.get("rss_mib")]
    if DRY or FAKE:
        pass
    elif rss:
        check("peak RSS <= 300 MiB (" + ", ".join(sorted(judged)) + ")", max(rss) <= 300,
              f"max {max(rss):.0f} MiB over {len(rss)} loads")
    else:
        nj("peak RSS <= 300 MiB", "no judged load reported its peak RSS")

    # Table last.
    table = {}
    for r in rows:
        t = table.setdefault(r["loader"], dict(cold=[], warm=[], rss=None, ttft=[], ttft_warm=[], open=None))
        if r.get("open") is not None:
            t["open"] = max(t["open"] or 0, r["open"])
        if r.get("gbps"):
            t["cold" if r["cold"] else "warm"].append(r["gbps"])
        if r.get("rss_mib"):
            t["rss"] = max(t["rss"] or 0, r["rss_mib"])
        if r.get("ttft") is not None:
            # Warm samples where there are any (the peers' are warm), as the table compares.
            t["ttft" if r["cold"] else "ttft_warm"].append(r["ttft"])
    f = lambda v, fmt: (fmt % v) if v is not None else "-"
    g = lambda v: f"{med(v):.2f} ({len(v)})" if v else "-"
    lines = ["", "| loader | cold GB/s (n) | warm GB/s (n) | peak RSS MiB | time to first tensor s | device open s |",
             "|---|---|---|---|---|---|"]
    for name, t in table.items():
        ttft = t["ttft_warm"] or t["ttft"]
        lines.append(f"| {name} | {g(t['cold'])} | {g(t['warm'])} | {f(t['rss'], '%.0f')} "
                     f"| {f(med(ttft) if ttft else None, '%.3f')} | {f(t['open'], '%.2f')} |")
    lines.append("")
    lines.append("median of the runs per row, (n) runs; the targets are judged on medians (warm: the fastest "
                 "configuration's loads when it was timed again; cold: interleaved samples); tensorstream GB/s and time to first tensor count from after the "
                 "device is open (index, plan, device allocation, reads, copies); device open (driver, "
                 "context, pinned ring) is the last column; for the peer comparison tensorstream's time "
                 "includes the device open except the CUDA context's creation, because torch's context is "
                 "created before the peers' timings (a NOTE gives the figure with it); the peers' RSS and "
                 "time to first tensor come from their '(warm, own process)' rows, one process per peer "
                 "(for safetensors, fastsafetensors and tensorizer, which hand over every tensor at once, the "
                 "first tensor comes with the whole load; the column is the median of a loader's warm rows) "
                 "(torch and its CUDA context included; the shared peer script runs them all in one "
                 "process that holds the whole file to write the tensorizer copy); '(explore)' rows come from "
                 "ts-gpu-bench tuning sweeps and are not judged; cold targets use interleaved medians. "
                 + ("tensorstream rows via the CLI" if CLI_GPU else "tensorstream rows via ts-gpu-bench (CLI had no GPU path)")
                 + (". DRY RUN: every load went to host memory, no GPU was used" if DRY else "")
                 + (". FAKE DRIVER RUN (fakecuda, a CPU stand-in): no GPU was used, no figure "
                    "measures one" if FAKE else ""))
    lines.append("checks: " + ", ".join(("ok " if ok else "FAIL ") + w for w, ok, _ in checks))
    for l in lines:
        say(l)
    say(f"total {time.time() - T0:.0f} s")
    sys.exit(0 if all(ok for _, ok, _ in checks) else 1)


def on_term(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def on_alarm(signum, frame):
    raise KeyboardInterrupt(f"hard time limit of {HARD:.0f} s reached")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_term)
    # The hard limit is a real stop: whatever runs then is killed, and the targets and the
    # table still come (a few seconds).
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(hard_left())))
    try:
        main()
    except BaseException as e:  # a crash or a kill: say so, then still judge and print the table
        kill_children()
        check("run completed", False, f"cut short: {e!r}")
    finally:
        signal.alarm(0)
        kill_children()
        finish()
