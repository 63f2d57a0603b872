"""The local cluster's Redis: a password of its own, never on a command line,
and never run as root."""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import shutil
import tempfile
from pathlib import Path

from services.cluster_layout import ClusterError

log = logging.getLogger("speechfront.cluster")


class LocalRedis:
    def __init__(self, port: int, run_dir: Path) -> None:
        self.port = port
        self._run_dir = run_dir
        # Redis asks every client for this password; each gets it in its URL.
        self.password = secrets.token_hex(16)
        self._workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def command(self) -> tuple[list[str], bytes]:
        """The command line and the configuration to give it on stdin.

        The configuration, password included, goes on stdin ("-"): never on a
        command line, never in a file.
        """
        redis = shutil.which("redis-server")
        if redis is None:
            raise ClusterError("redis-server is not installed (make setup installs it)")
        prefix, workdir = self._unprivileged()
        config = "\n".join(
            [
                f"port {self.port}",
                "bind 127.0.0.1",
                'save ""',
                "appendonly no",
                f'dir "{workdir}"',
                f"requirepass {self.password}",
                "",
            ]
        )
        return [*prefix, redis, "-"], config.encode()

    def remove_workdir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _unprivileged(self) -> tuple[list[str], Path]:
        """How to start Redis without root, and its working directory.

        A cluster started by root runs Redis as ``nobody``, in a directory of its
        own under the system temp directory (the run directory may sit where
        ``nobody`` cannot go, as pytest's does); otherwise as the caller, in the
        run directory.
        """
        own = self._run_dir.resolve()
        if os.geteuid() != 0:
            return [], own
        try:
            user = pwd.getpwnam("nobody")
        except KeyError:
            log.warning("no user nobody: the local Redis runs as root")
            return [], own
        setpriv, runuser = shutil.which("setpriv"), shutil.which("runuser")
        if setpriv is not None:
            ids = [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
            prefix = [setpriv, *ids, "--"]
        elif runuser is not None:
            prefix = [runuser, "-u", user.pw_name, "--"]
        else:
            log.warning("neither setpriv nor runuser is installed: the local Redis runs as root")
            return [], own
        if self._workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="speechfront-redis-"))
            os.chown(workdir, user.pw_uid, user.pw_gid)
            self._workdir = workdir
        return prefix, self._workdir
