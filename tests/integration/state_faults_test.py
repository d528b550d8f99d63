#!/usr/bin/python3
"""The --state-dir is optional state: no fault of it stops engramd from starting or serving.

Against a real engramd serving an NVMe-backed table (so it snapshots hot sets), each case checks
the log line that says what happened and that rows read over shared memory afterwards equal the
pack file's bytes:
  - a corrupt store is moved aside (not deleted), a fresh one made, and the daemon starts;
  - a store another process holds locked is left alone and the daemon starts cold;
  - a state dir that cannot be created, or a full one (a tmpfs filled before start), starts cold;
  - on a tmpfs filled while serving, snapshots pause, then resume once space returns;
  - an unclean previous shutdown (kill -9) is logged at the next start.
The tmpfs cases need `mount`; where it is not allowed they are skipped with the reason.
Run with /usr/bin/python3. Usage: state_faults_test.py ENGRAMD ENGRAMCTL
"""
import fcntl
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

ENGRAMD = ENGRAMCTL = None


def read_log(path):
    with open(path) as f:
        return f.read()


class StateFaultsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="engram-state-")
        cls.pack = os.path.join(cls.tmp.name, "pack")
        subprocess.run([ENGRAMCTL, "pack", "create", "--preset", "demo-v1", "--scale", "0.002", "--quiet",
                        "--out", cls.pack], check=True)
        cls.manifest = json.load(open(os.path.join(cls.pack, "manifest.json")))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def start(self, state_dir, name, extra=()):
        ports = os.path.join(self.tmp.name, name + ".ports")
        if os.path.exists(ports):
            os.remove(ports)
        self.log_path = os.path.join(self.tmp.name, name + ".log")
        self.socket = os.path.join(self.tmp.name, name + ".sock")
        log = open(self.log_path, "a")
        # A budget far below the table: it is served from its pack file with a cache, and snapshotted.
        proc = subprocess.Popen([ENGRAMD, "--pack", self.pack, "--listen", "127.0.0.1:0", "--metrics-listen", "off",
                                 "--ports-file", ports, "--socket", self.socket, "--dram-budget", "2M",
                                 "--state-dir", state_dir, "--snapshot-interval-s", "1"] + list(extra),
                                stdout=log, stderr=log)
        deadline = time.time() + 60
        while not os.path.exists(ports):
            if proc.poll() is not None or time.time() > deadline:
                self.fail("engramd did not start: " + read_log(self.log_path))
            time.sleep(0.05)
        log.close()
        return proc

    def stop(self, proc):
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=30), 0, read_log(self.log_path))

    def wait_for_log(self, needle, timeout=15):
        deadline = time.time() + timeout
        while needle not in read_log(self.log_path):
            if time.time() > deadline:
                self.fail("no %r in the log:\n%s" % (needle, read_log(self.log_path)))
            time.sleep(0.1)

    def assert_serves_the_packs_rows(self):
        layer = self.manifest["layers"][0]
        head_rows = layer["head_rows"]
        idx = np.array([[(7 * t + h) % head_rows[h] for h in range(len(head_rows))] for t in range(32)], dtype="<u4")
        idx.tofile(os.path.join(self.tmp.name, "idx.u32"))
        out = os.path.join(self.tmp.name, "rows.bin")
        subprocess.run([ENGRAMCTL, "lookup", "--daemon", "unix://" + self.socket, "--table", self.manifest["name"],
                        "--layer", str(layer["id"]), "--indices", os.path.join(self.tmp.name, "idx.u32"),
                        "--out", out], check=True, stdout=subprocess.DEVNULL)
        row_bytes = self.manifest["row"]["bytes"]
        table = np.fromfile(os.path.join(self.pack, layer["file"]), dtype=np.uint8).reshape(-1, row_bytes)
        offsets = np.concatenate([[0], np.cumsum(head_rows)[:-1]])
        want = table[(idx.astype(np.int64) + offsets[None, :]).reshape(-1)].tobytes()
        with open(out, "rb") as f:
            self.assertEqual(f.read(), want)

    def test_a_corrupt_store_is_moved_aside_and_a_fresh_one_made(self):
        state = os.path.join(self.tmp.name, "corrupt")
        proc = self.start(state, "corrupt")
        self.wait_for_log('event=hot_set_saved')
        self.stop(proc)
        with open(os.path.join(state, "CURRENT"), "w") as f:
            f.write("garbage-that-names-no-manifest\n")
        proc = self.start(state, "corrupt")
        self.wait_for_log('event=state_store_moved_aside')
        line = [l for l in read_log(self.log_path).splitlines() if "state_store_moved_aside" in l][-1]
        aside = re.search(r'\bto="?([^" ]+)', line).group(1)
        self.assertTrue(os.path.exists(os.path.join(aside, "CURRENT")), line)  # kept, not deleted
        with open(os.path.join(aside, "CURRENT")) as f:
            self.assertIn("garbage", f.read())
        self.assert_serves_the_packs_rows()
        self.wait_for_log('event=hot_set_saved')  # the fresh store takes snapshots
        self.stop(proc)
        shutil.rmtree(aside, ignore_errors=True)

    def test_a_store_locked_by_another_process_is_left_alone(self):
        state = os.path.join(self.tmp.name, "locked")
        proc = self.start(state, "locked")
        self.stop(proc)
        with open(os.path.join(state, "LOCK"), "a+") as lock:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            proc = self.start(state, "locked")
            self.wait_for_log('event=state_store_unavailable')
            self.assertIn("locked", read_log(self.log_path))
            self.assert_serves_the_packs_rows()
            self.stop(proc)
        self.assertFalse([p for p in os.listdir(self.tmp.name) if p.startswith("locked.corrupt")])

    def test_a_state_dir_that_cannot_be_made_starts_cold(self):
        blocker = os.path.join(self.tmp.name, "a-file")
        open(blocker, "w").close()
        proc = self.start(os.path.join(blocker, "state"), "nodir")
        self.wait_for_log('event=state_dir_unusable')
        self.assert_serves_the_packs_rows()
        self.stop(proc)

    def test_an_unclean_shutdown_is_logged_at_the_next_start(self):
        state = os.path.join(self.tmp.name, "unclean")
        proc = self.start(state, "unclean")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc = self.start(state, "unclean")
        self.wait_for_log('event=unclean_shutdown')
        self.assert_serves_the_packs_rows()
        self.stop(proc)
        proc = self.start(state, "unclean2")  # a clean stop leaves no marker
        self.stop(proc)
        self.assertNotIn("unclean_shutdown", read_log(self.log_path))

    def mount_tmpfs(self, path, size):
        os.makedirs(path, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", path], capture_output=True,
                           text=True)
        if r.returncode != 0:
            self.skipTest("cannot mount a tmpfs here (%s): the full-disk cases need one" % r.stderr.strip())
        self.addCleanup(lambda: subprocess.run(["umount", "-l", path]))

    def test_a_full_disk_before_start_starts_cold(self):
        state = os.path.join(self.tmp.name, "full-before")
        self.mount_tmpfs(state, "4M")
        with open(os.path.join(state, "filler"), "wb") as f:
            try:
                f.write(b"\0" * (8 << 20))
            except OSError:
                pass
        proc = self.start(state, "fullbefore")
        self.wait_for_log('event=state_dir_unusable')
        self.assertIn("bytes free", read_log(self.log_path))
        self.assert_serves_the_packs_rows()
        self.stop(proc)

    def test_a_disk_that_fills_while_serving_pauses_snapshots_until_space_returns(self):
        state = os.path.join(self.tmp.name, "full-later")
        self.mount_tmpfs(state, "16M")
        proc = self.start(state, "fulllater", ["--state-min-free", "4M"])
        self.wait_for_log('event=hot_set_saved')
        filler = os.path.join(state, "filler")
        with open(filler, "wb") as f:
            try:
                f.write(b"\0" * (16 << 20))
            except OSError:
                pass
        self.wait_for_log('event=state_snapshots_paused')
        self.assert_serves_the_packs_rows()
        os.remove(filler)
        self.wait_for_log('event=state_snapshots_resumed')
        self.stop(proc)


if __name__ == "__main__":
    ENGRAMD, ENGRAMCTL = sys.argv[1], sys.argv[2]
    unittest.main(argv=sys.argv[:1], verbosity=2)
