#!/usr/bin/env python3
"""A provisioning helper for the tests: does what the file named by $HELPER_MODE says.

accept [DAYS] | renew | defer | reject | crash | hang | garbage. It signs with the CA in $HELPER_CA.
"""

import json
import os
import sys
import time

from directord.security.pki import PKI, parse_request

request = json.load(sys.stdin)
with open(os.environ["HELPER_MODE"]) as fh:
    mode, *rest = fh.read().split()
if mode == "defer":
    print(json.dumps({"defer": True, "msg": "not yet"}))
elif mode == "reject":
    print(json.dumps({"reject": True, "msg": "not in the inventory system"}))
elif mode == "crash":
    print("helper broke", file=sys.stderr)
    sys.exit(3)
elif mode == "hang":
    time.sleep(120)
elif mode == "garbage":
    print("this is not json")
else:
    pki = PKI(os.environ["HELPER_CA"])
    csr = parse_request(request["csr"].encode(), "csr")
    days = int(rest[0]) if rest else 30
    if mode == "renew":  # one day the first time this node asks, thirty after
        seen = os.environ["HELPER_MODE"] + "." + request["identity"]
        days = 30 if os.path.exists(seen) else 1
        open(seen, "w").close()
    cert = pki.sign_pem(csr, "client", days).decode()
    node_pki = request["inventory"]["pki_dir"]
    ident = request["identity"]
    config = json.loads(os.environ["HELPER_CONFIG"].replace("IDENTITY", ident))
    config.update(
        grpc_ssl=True,
        grpc_ssl_client_auth=True,
        grpc_ssl_ca=f"{node_pki}/ca.crt",
        grpc_ssl_cert=f"{node_pki}/certs/{ident}.crt",
        grpc_ssl_key=f"{node_pki}/private/{ident}.key",
    )
    print(
        json.dumps(
            {"certificate": cert, "ca": pki.ca_cert_path.read_text(), "configuration": config}
        )
    )
