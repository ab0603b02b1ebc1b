"""`fedrec deploy init`: certificates, SuperNode keys, commands and READMEs for a real federation.

One coordinator runs Flower's SuperLink (and submits the run with `flwr run`); each partner
institution runs one SuperNode on its own machine, next to its own data. What is generated:

    DIR/deployment.json              what was generated (no secrets)
    DIR/ca/ca.key                    the CA's private key: signs the SuperLink certificate; keep offline
    DIR/coordinator/                 ca.pem, superlink.pem/.key, supernodes/<name>.pub,
                                     ledger-keys/<name>.pub, superlink.sh, register-supernodes.sh,
                                     run.sh, flwr-home/, README.md
    DIR/institutions/<name>/         ca.pem, supernode.pub, settings.toml, supernode.sh, README.md

Keys: every institution makes its own keys first, on its own machine (`fedrec deploy keygen
STATE_DIR --name NAME`: the SuperNode key and the ledger-signing key), and sends only the `.pub`
files; `deploy init --institution-keys DIR` reads DIR/<name>/supernode.pub and ledger.pub. No
institution's private key is ever written on the coordinator's disk. (`--insecure`, development on
one machine, needs no keys.)

TLS: the SuperLink presents a certificate signed by the CA, valid for HOST and for
127.0.0.1/localhost (the ServerApp process and the SuperExec reach it locally). Each SuperNode
checks it against ca.pem. Node authentication: each SuperNode signs its requests with its own EC
P-384 key (OpenSSH format, as `flower-supernode --auth-supernode-private-key` reads it); the
SuperLink (`--enable-supernode-auth`) accepts only keys registered with `flwr supernode register`.
The insecure mode (no TLS, no node authentication) exists for development on one machine only.
"""
