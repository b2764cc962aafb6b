"""Zero-touch enrolment (seed 003, Choria's provisioner): nodes join by themselves.

A node started in provisioning mode (:mod:`.node`) holds only a token and the
provisioner's CA certificate. It announces itself over TLS; the provisioner
(:mod:`.provisioner`) asks for its inventory and a CSR, hands them to a helper
(:mod:`.helpers`) that signs or defers or rejects, sends back the certificate
and configuration, and tells the node to restart into the cluster. No private
key leaves its node. Messages are in :mod:`directord.protocol.provisioning`.
"""
