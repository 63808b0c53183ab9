"""The monarch-gateway command line: conventions and refusals, before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monarch_gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_help_exits_zero_and_names_the_commands():
    result = run("--help")
    assert result.returncode == 0
    assert "serve" in result.stdout and "local" in result.stdout
    assert run("serve", "--help").returncode == 0


def test_serve_refuses_to_run_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != "MONARCH_GATEWAY_TOKEN"}
    result = run("serve", "--workers", "tcp://127.0.0.1:1", env=env)
    assert result.returncode == 2
    assert "bearer token is required" in result.stderr


def test_serve_needs_workers_and_well_formed_meshes():
    assert "--mesh NAME=ADDR" in run("serve", "--insecure-no-token").stderr
    bad = run("serve", "--mesh", "no-equals-sign", "--insecure-no-token")
    assert bad.returncode == 2 and "expected NAME=ADDR" in bad.stderr


def test_tls_flags_go_together():
    result = run(
        "serve", "--workers", "tcp://127.0.0.1:1", "--insecure-no-token", "--tls-cert", "x.pem"
    )
    assert result.returncode == 2 and "--tls-cert and --tls-key go together" in result.stderr


def test_unreachable_workers_fail_with_a_clear_message():
    result = run(
        "serve",
        "--workers",
        "tcp://127.0.0.1:9",
        "--insecure-no-token",
        "--attach-timeout",
        "3",
        "--port",
        "0",
    )
    assert result.returncode == 1
    assert "workers did not all answer within 3s" in result.stderr


def test_local_prints_where_to_connect_and_stops_cleanly_on_sigterm():
    import signal

    from monarch_proxy import connect

    process = subprocess.Popen(
        [sys.executable, "-m", "monarch_gateway", "local", "--hosts", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = dict(process.stdout.readline().split(":", 1) for _ in range(2))  # type: ignore[union-attr]
        url, token = lines["gateway"].strip(), lines["token"].strip()
        with connect(url, token) as job:
            assert job.hosts.extent.as_dict() == {"hosts": 1}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
