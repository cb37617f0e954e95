"""A `topup serve` process on 127.0.0.1, for the tests (tests/api, tests/hil) and the
service benchmark: started with the environment given (TOPUP_DB, TOPUP_PASSPHRASE, ...),
its output to a log file, ready once /healthz answers 200."""
import os
import signal
import subprocess
import sys
import time

from tests.pg_server import free_port

TOPUP = os.path.join(os.path.dirname(sys.executable), "topup")


class ServeProcess:
    def __init__(self, env, log_path, *extra, port=None):
        self.port = free_port() if port is None else port
        self.url = "http://127.0.0.1:%d" % self.port
        self.log_path = str(log_path)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([TOPUP, "serve", "--port", str(self.port), *extra],
                                     env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def ready(self, timeout=30):
        """Wait until it answers /healthz; returns self. AssertionError with the end of its
        log if it exits or does not answer in `timeout` s."""
        import httpx
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("topup serve exited %s: %s" % (
                    self.proc.returncode, self.output()[-2000:]))
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("topup serve did not come up in %d s: %s"
                                     % (timeout, self.output()[-2000:]))
            time.sleep(0.05)

    def output(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
