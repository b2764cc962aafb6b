"""``directord pki``: the built-in certificate authority."""

from __future__ import annotations

import argparse

from directord.cli.render import table, to_json
from directord.config import Settings
from directord.errors import CertificateError
from directord.security.pki import PKI, read_request


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Pki sub-actions."""
    sub = p.add_subparsers(dest="pki_action", metavar="ACTION", required=True)
    a = sub.add_parser("init", help="create the CA (refuses to overwrite one)")
    a.add_argument("--ca-name", default="directord CA", help="the CA's common name")
    for action, text in (
        ("issue", "issue a key and certificate signed by the CA"),
        ("rotate", "replace NAME's key and certificate (old ones kept)"),
        ("csr", "on a node: make a key and a signing request"),
    ):
        a = sub.add_parser(action, help=text)
        a.add_argument("name", help="certificate name (node identity, operator, server host name)")
        a.add_argument(
            "--san",
            action="append",
            default=None,
            metavar="NAME_OR_IP",
            help="extra subject alternative name (repeatable)",
        )
        if action != "csr":
            _usage_args(a, "the old certificate's" if action == "rotate" else "client")
    a = sub.add_parser("sign", help="on the CA: sign a request made with `pki csr`")
    a.add_argument("csr_file", help="the .csr file")
    _usage_args(a, "client")
    a.add_argument(
        "--keep-sans",
        action="store_true",
        help="sign the subject alternative names the request asks for (default: the CN only)",
    )
    a.add_argument(
        "--name",
        dest="expect_name",
        metavar="NAME",
        help="refuse the request unless it is for NAME (a host asked for a certificate "
        "must not get one for another host's name)",
    )
    a = sub.add_parser("list", help="every certificate with its names and expiry")
    a.add_argument("--format", choices=("table", "json"), default="table")
    a = sub.add_parser("revoke", help="revoke NAME's certificate (CRL)")
    a.add_argument("name")


def _usage_args(a: argparse.ArgumentParser, default: str) -> None:
    """--client / --operator / --server; ``default`` says which usage applies without them."""
    g = a.add_mutually_exclusive_group()
    for flag, text in (
        ("client", "a node's certificate: client authentication only"),
        ("operator", "an operator's certificate, for the user API over TCP"),
        ("server", "server authentication only"),
    ):
        g.add_argument(f"--{flag}", dest="usage", action="store_const", const=flag, help=text)
    a.description = f"Without --client, --operator or --server the usage is {default}."
    a.add_argument("--days", type=int, default=365, help="validity in days (365)")


def run_pki(ns: argparse.Namespace, settings: Settings) -> int:
    """Run one pki action."""
    pki = PKI(settings.pki_dir)
    action = ns.pki_action
    if action == "init":
        print(f"CA certificate: {pki.init(ns.ca_name)}")
    elif action == "issue":
        cert, key = pki.issue(ns.name, ns.san, ns.usage or "client", ns.days)
        print(f"certificate: {cert}\nkey:         {key}")
    elif action == "rotate":
        cert, key = pki.rotate(ns.name, ns.san, ns.usage, ns.days)
        print(f"certificate: {cert}\nkey:         {key}\n(old files moved to {pki.dir / 'old'})")
    elif action == "csr":
        print(f"request: {pki.csr(ns.name, ns.san)}\nkey:     {pki.key_path(ns.name)}")
    elif action == "sign":
        _sign(pki, ns)
    elif action == "list":
        rows = pki.list()
        if ns.format == "json":
            print(to_json([r.to_dict() for r in rows]))
        else:
            print(
                table(
                    [
                        [
                            r.name,
                            r.usage,
                            r.not_after.strftime("%Y-%m-%d"),
                            "revoked" if r.revoked else "valid",
                            ",".join(r.sans),
                            f"{r.serial:x}"[:16],
                        ]
                        for r in rows
                    ],
                    ["NAME", "USAGE", "EXPIRES", "STATUS", "NAMES", "SERIAL"],
                )
            )
    elif action == "revoke":
        print(f"revoked {ns.name} (serial {pki.revoke(ns.name):x}); CRL: {pki.crl_path}")
    return 0


def _sign(pki: PKI, ns: argparse.Namespace) -> None:
    """Sign a request, first showing what it asks for and which names are signed."""
    request = read_request(ns.csr_file)
    if ns.expect_name is not None and request.name != ns.expect_name:
        raise CertificateError(
            f"{ns.csr_file}: the request is for {request.name!r}, not {ns.expect_name!r}; "
            "not signed"
        )
    usage = ns.usage or "client"
    names = list(dict.fromkeys([request.name, *request.sans])) if ns.keep_sans else [request.name]
    left_out = [n for n in request.sans if n not in names]
    asked = [*request.sans, *request.other_names]
    print(f"request:     {request.name} ({request.path})")
    print(f"asks for:    {', '.join(asked) or '(no subject alternative names)'}")
    note = f"  (left out: {', '.join(left_out)}; --keep-sans signs them)" if left_out else ""
    print(f"names:       {', '.join(names)}{note}")
    if request.other_names:
        print(f"never signed: {', '.join(request.other_names)} (only DNS names and addresses)")
    print(f"usage:       {usage}")
    print(f"certificate: {pki.sign(ns.csr_file, usage, ns.days, keep_sans=ns.keep_sans)}")
