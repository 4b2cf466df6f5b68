"""The Kubernetes mutating admission webhook: ``credsidecar injector``.

A pod annotated ``credsidecar.io/inject: "true"`` (or, in migration mode, carrying Vault
Agent Injector annotations) gets credsidecar as a native sidecar. One job per module:

``settings``      the injector's own settings (flags or a small config file)
``request``       the typed injection request every translator produces
``annotations``   ``credsidecar.io/*`` annotations -> request
``vaultcompat``   ``vault.hashicorp.com/*`` annotations -> request
``gotemplate``    Vault Agent (Go) templates of the common forms -> Jinja
``agentconfig``   request -> the sidecar's agent config
``patch``         request -> the pod's JSONPatch
``review``        one AdmissionReview in, one answer out (pure)
``server``        the HTTPS server; TLS files re-read when they change

Only the ``injector`` subcommand imports this package: the agent never pays for it.
"""
