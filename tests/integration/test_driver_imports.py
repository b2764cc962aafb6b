"""Reading every driver's options imports no driver library; only the selected driver's is.

Each check runs in a fresh interpreter, whose ``sys.modules`` the other tests
have not filled.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

LIBRARIES = ("grpc", "zmq", "aio_pika", "nats")


def run(code: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok", proc.stdout


def test_options_and_flags_import_no_driver_library() -> None:
    run(
        f"""
        import sys
        from directord.cli.main import build_parser
        from directord.config import load_settings

        env = {{"DIRECTORD_CONFIG_FILE": "/dev/null"}}
        build_parser()
        load_settings({{"driver": "zmq"}}, env)
        loaded = sorted(set({LIBRARIES!r}) & set(sys.modules))
        assert not loaded, loaded
        from directord.transports import load_transport

        load_transport(load_settings({{"driver": "messaging"}}, env))
        loaded = sorted(set({LIBRARIES!r}) & set(sys.modules))
        assert loaded == ["aio_pika"], loaded
        print("ok")
        """
    )


def test_a_missing_library_fails_only_the_driver_that_needs_it() -> None:
    run(
        f"""
        import sys
        for name in {LIBRARIES!r}:
            sys.modules[name] = None  # as if not installed: importing it raises ImportError

        from directord.config import drivers, load_settings, option_fields
        from directord.errors import MissingDependencyError
        from directord.transports import load_transport

        names = {{f.name for f in option_fields()}}
        assert {{"grpc_port", "job_port", "messaging_url", "nats_url"}} <= names, names
        assert not drivers().problems, drivers().problems
        env = {{"DIRECTORD_CONFIG_FILE": "/dev/null"}}
        load_transport(load_settings({{"driver": "memory"}}, env))
        for driver, hint in [
            ("grpc", "pip install grpcio"),
            ("zmq", "pip install directord[zmq]"),
            ("messaging", "pip install directord[amqp]"),
            ("nats", "pip install directord[nats]"),
        ]:
            try:
                load_transport(load_settings({{"driver": driver}}, env))
            except MissingDependencyError as exc:
                assert str(exc) == hint, exc
            else:
                raise AssertionError(driver)
        print("ok")
        """
    )
