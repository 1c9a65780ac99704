#!/usr/bin/env python3
"""Checks the judging of scripts/gpu_check.py (run by scripts/test.sh; no GPU needed): the
targets must fail when a row says so, and the peers' rows must all be kept."""
import importlib.util
import io
import os
import unittest
from contextlib import redirect_stdout

HERE = os.path.dirname(os.path.abspath(__file__))


def fresh():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(HERE, "gpu_check.py"))
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    gc.OUT = None
    gc.DRY = False
    gc.COLD_OK = True
    gc.CLI_GPU = True
    return gc


def judge(rows):
    """Runs finish() on rows; returns {check name prefix: (ok, detail)}."""
    gc = fresh()
    gc.rows.extend(rows)
    with redirect_stdout(io.StringIO()):
        try:
            gc.finish()
        except SystemExit:
            pass
    return {w: (ok, d) for w, ok, d in gc.checks}


def find(checks, prefix):
    hits = [v for k, v in checks.items() if k.startswith(prefix)]
    assert len(hits) == 1, (prefix, list(checks))
    return hits[0]


def ts(loader, gbps, cold, rss=238.0, secs=3.5, open_s=0.4, ctx=0.25, direct=True):
    nbytes = gbps * secs * 1e9
    return dict(loader=loader, cold=cold, gbps=gbps, secs=secs, rss_mib=rss, cli=True,
                direct_io=direct, open=open_s,
                gbps_open=nbytes / (secs + open_s) / 1e9,
                gbps_open_nc=nbytes / (secs + open_s - ctx) / 1e9)


def raw(gbps):
    return dict(loader="raw O_DIRECT read 32 thr x 16 MiB", cold=True, gbps=gbps, raw=True)


def peer(name, gbps, cold=True):
    return dict(loader="peer: " + name, cold=cold, gbps=gbps, secs=1.0, peer=True)


PEERS = [peer("safetensors.load_file(cuda)", 1.4), peer("runai SafetensorsStreamer (cpu->cuda)", 1.5),
         peer("fastsafetensors nogds", 1.6), peer("tensorizer TensorDeserializer(cuda) {}", 1.6)]
RING = "tensorstream (ring) [ring]"


class Judge(unittest.TestCase):
    def test_warm_is_judged_on_the_median_not_one_lucky_load(self):
        c = judge([ts(RING, g, False) for g in (41.0, 38.0, 37.0)])
        ok, detail = find(c, "warm -> GPU")
        self.assertFalse(ok, detail)
        self.assertIn("median 38.00", detail)
        c = judge([ts(RING, g, False) for g in (41.0, 40.5, 37.0)])
        self.assertTrue(find(c, "warm -> GPU")[0])

    def test_speed_and_memory_are_met_by_one_configuration(self):
        big = "tensorstream --big [ring]"
        rows = [ts(RING, 39.0, False), ts(RING, 39.5, False),
                ts(big, 45.0, False, rss=900.0), ts(big, 46.0, False, rss=900.0)]
        # No configuration meets both: the fastest is judged, and its memory fails.
        c = judge(rows)
        self.assertTrue(find(c, "warm -> GPU")[0])
        ok, detail = find(c, "peak RSS")
        self.assertFalse(ok, detail)
        # One that meets both is judged instead of a faster one that does not.
        c = judge(rows + [ts(RING, 41.0, False), ts(RING, 41.0, False)])
        ok, detail = find(c, "warm -> GPU")
        self.assertTrue(ok)
        self.assertIn(RING, detail)
        self.assertTrue(find(c, "peak RSS")[0])

    def test_cold_needs_both_the_raw_read_ratio_and_every_peer(self):
        rows = [raw(1.6), raw(1.7), raw(1.65)] + [ts(RING, g, True) for g in (1.9, 1.8, 2.0)] + PEERS
        c = judge(rows)
        self.assertTrue(find(c, "cold >= 0.95")[0])
        self.assertTrue(find(c, "cold faster than every peer")[0])
        # A peer whose median beats tensorstream's fails the check, whatever its slowest sample.
        rows += [peer("fastsafetensors nogds", 2.3), peer("fastsafetensors nogds", 2.2)]
        ok, detail = find(judge(rows), "cold faster than every peer")
        self.assertFalse(ok, detail)
        self.assertIn("fastsafetensors", detail)

    def test_a_missing_peer_is_a_failure_not_a_silent_gap(self):
        rows = [raw(1.6)] + [ts(RING, 1.9, True)] + PEERS[:3]
        ok, detail = find(judge(rows), "every peer ran")
        self.assertFalse(ok)
        self.assertIn("tensorizer", detail)
        # Beating the peers that ran is not beating every peer: the missing one may be fastest.
        ok, detail = find(judge(rows), "cold faster than every peer")
        self.assertFalse(ok, detail)
        self.assertIn("NOT JUDGED", detail)
        self.assertIn("tensorizer", detail)

    def test_cold_loads_must_bypass_the_page_cache(self):
        rows = [raw(1.6), ts(RING, 1.9, True), ts(RING, 1.9, True, direct=False)] + PEERS
        self.assertFalse(find(judge(rows), "cold loads read with O_DIRECT")[0])

    def test_the_peers_rows_keep_tensorizers_deserializer(self):
        gc = fresh()
        got = gc.peer_rows([
            {"name": "tensorizer serialize (cpu)", "secs": 3.0, "gbps": 2.0, "cold": False},
            {"name": "tensorizer TensorDeserializer(cuda) {}", "secs": 4.0, "gbps": 1.6, "cold": True},
            {"name": "safetensors.load_file(cuda)", "secs": 4.0, "gbps": 1.5, "cold": True},
        ])
        self.assertEqual([r["loader"] for r in got],
                         ["peer: tensorizer TensorDeserializer(cuda) {}", "peer: safetensors.load_file(cuda)"])


class Confirmation(unittest.TestCase):
    def test_the_fastest_configuration_is_judged_on_its_second_timing(self):
        big = "tensorstream --slots 64 [ring]"
        sweep = [ts(RING, 38.0, False), ts(RING, 38.5, False), ts(big, 45.0, False), ts(big, 46.0, False)]
        for r in sweep[2:]:
            r["flags"] = ["--slots", "64"]
        gc = fresh()
        gc.rows.extend(sweep)
        pick = gc.warm_pick()
        self.assertEqual((pick["loader"], pick["flags"]), (big, ["--slots", "64"]))
        again = [dict(ts(big, g, False), flags=["--slots", "64"], confirm=True) for g in (38.0, 39.0, 38.5)]
        ok, detail = find(judge(sweep + again), "warm -> GPU")
        self.assertFalse(ok, detail)
        self.assertIn("median 38.50", detail)
        self.assertIn("timed again", detail)
        again = [dict(ts(big, g, False), flags=["--slots", "64"], confirm=True) for g in (41.0, 42.0, 40.5)]
        c = judge(sweep + again)
        self.assertTrue(find(c, "warm -> GPU")[0])
        self.assertTrue(find(c, "peak RSS")[0])


class Parsing(unittest.TestCase):
    def test_peer_lines_count_even_without_the_closing_list(self):
        gc = fresh()
        out = ('{"name": "safetensors.load_file(cuda)", "secs": 4.1, "gbps": 1.6, "cold": true}\n'
               "runai failed: ImportError\n"
               '{"name": "fastsafetensors nogds", "secs": 3.0, "gbps": 2.2, "cold": true}\n')
        self.assertEqual([r["name"] for r in gc.peer_results(out)],
                         ["safetensors.load_file(cuda)", "fastsafetensors nogds"])

    def test_a_peer_alone_gives_its_rss_and_first_tensor_to_the_table(self):
        gc = fresh()
        out = "some warning\n" + '{"secs": 3.2, "ttft": 0.41, "gbps": 2.03}\n'
        row = gc.peer_alone_row("fastsafetensors", out, 2100.0)
        self.assertEqual((row["loader"], row["cold"], row["peer"]),
                         ("peer: fastsafetensors (warm, own process)", False, True))
        self.assertEqual((row["gbps"], row["ttft"], row["rss_mib"]), (2.03, 0.41, 2100.0))
        self.assertIsNone(gc.peer_alone_row("runai", "Traceback ...\n", 900.0))
        # Shown, never judged: a warm peer row is not a cold sample of that peer.
        checks = judge([raw(1.6), ts(RING, 1.9, True)] + PEERS + [row])
        self.assertTrue(find(checks, "cold faster than every peer")[0])

    def test_reference_digests_parse_the_file_independently(self):
        import hashlib, json as js, struct, tempfile
        gc = fresh()
        blobs = {"a": b"\x01" * 10, "b": bytes(range(256)) * 3, "empty": b""}
        hdr, off = {"__metadata__": {"format": "pt"}}, 0
        for k, b in blobs.items():
            hdr[k] = {"dtype": "U8", "shape": [len(b)], "data_offsets": [off, off + len(b)]}
            off += len(b)
        h = js.dumps(hdr).encode()
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
            f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs.values()))
            f.flush()
            got = gc.file_digests(f.name, threads=2)
        self.assertEqual(got, {k: hashlib.sha256(b).hexdigest() for k, b in blobs.items()})


if __name__ == "__main__":
    unittest.main()
