#!/usr/bin/env python3
"""A provisioning helper that picks each node's server from a fact, as Choria's example does.

The provisioner runs it once per node with ``{identity, csr, inventory}`` on
stdin; it prints ``{defer, msg, certificate, ca, configuration, reject}``.
Nodes announce a ``country`` fact (``--provisioning-facts``); each country has
its own server. A node of an unknown country is deferred (perhaps its facts
file is not written yet); a node named ``test-*`` is rejected.

    directord provisioner --helper /usr/local/bin/provisioning-helper-by-country.py ...

Signing is done with directord's PKI (``CA`` below), so the node's key never
leaves the node: only its CSR comes here.
"""

import json
import os
import sys

from directord.security.pki import PKI, parse_request

CA = os.environ.get("DIRECTORD_PKI_DIR", "/etc/directord/pki")
SERVERS = {"de": "directord.de.example.net", "nl": "directord.nl.example.net"}


def answer(reply: dict) -> None:
    """The helper's one answer: a JSON object on stdout."""
    sys.stdout.write(json.dumps(reply) + "\n")


request = json.load(sys.stdin)
identity = request["identity"]
facts = request["inventory"].get("facts", {})
if identity.startswith("test-"):
    answer({"reject": True, "msg": "test machines are not enrolled"})
    sys.exit(0)
server = SERVERS.get(str(facts.get("country", "")).lower())
if server is None:
    answer({"defer": True, "msg": f"no server for country {facts.get('country')!r}"})
    sys.exit(0)
pki = PKI(CA)
certificate = pki.sign_pem(parse_request(request["csr"].encode(), identity), "client", 90)
node_pki = request["inventory"]["pki_dir"]
answer(
    {
        "certificate": certificate.decode(),
        "ca": pki.ca_cert_path.read_text(),
        "configuration": {
            "grpc_server_address": server,
            "grpc_ssl": True,
            "grpc_ssl_client_auth": True,
            "grpc_ssl_ca": f"{node_pki}/ca.crt",
            "grpc_ssl_cert": f"{node_pki}/certs/{identity}.crt",
            "grpc_ssl_key": f"{node_pki}/private/{identity}.key",
        },
    }
)
