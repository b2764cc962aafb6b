"""``directord pki``: the built-in certificate authority."""

from __future__ import annotations

import argparse

from directord.cli.render import table, to_json
from directord.config import Settings
from directord.security.pki import PKI


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
        a.add_argument("name", help="certificate name (node identity or server host name)")
        a.add_argument(
            "--san",
            action="append",
            default=None,
            metavar="NAME_OR_IP",
            help="extra subject alternative name (repeatable)",
        )
        if action != "csr":
            _usage_args(a)
    a = sub.add_parser("sign", help="on the CA: sign a request made with `pki csr`")
    a.add_argument("csr_file", help="the .csr file")
    _usage_args(a)
    a = sub.add_parser("list", help="every certificate with its names and expiry")
    a.add_argument("--format", choices=("table", "json"), default="table")
    a = sub.add_parser("revoke", help="revoke NAME's certificate (CRL)")
    a.add_argument("name")


def _usage_args(a: argparse.ArgumentParser) -> None:
    g = a.add_mutually_exclusive_group()
    g.add_argument(
        "--server",
        dest="usage",
        action="store_const",
        const="server",
        help="server authentication only",
    )
    g.add_argument(
        "--client",
        dest="usage",
        action="store_const",
        const="client",
        help="client authentication only",
    )
    a.add_argument("--days", type=int, default=365, help="validity in days (365)")


def run_pki(ns: argparse.Namespace, settings: Settings) -> int:
    """Run one pki action."""
    pki = PKI(settings.pki_dir)
    action = ns.pki_action
    if action == "init":
        print(f"CA certificate: {pki.init(ns.ca_name)}")
    elif action == "issue":
        cert, key = pki.issue(ns.name, ns.san, ns.usage or "both", ns.days)
        print(f"certificate: {cert}\nkey:         {key}")
    elif action == "rotate":
        cert, key = pki.rotate(ns.name, ns.san, ns.usage, ns.days)
        print(f"certificate: {cert}\nkey:         {key}\n(old files moved to {pki.dir / 'old'})")
    elif action == "csr":
        print(f"request: {pki.csr(ns.name, ns.san)}\nkey:     {pki.key_path(ns.name)}")
    elif action == "sign":
        print(f"certificate: {pki.sign(ns.csr_file, ns.usage or 'both', ns.days)}")
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
