"""The TIDE operator: `TideDeployment` and `DraftVersion` (tide.dev/v1alpha1) on Kubernetes, run by kopf.

Importing this package registers nothing: the kopf handlers live in `tide_operator.handlers`
(`kopf run -m tide_operator.handlers`, or `python -m tide_operator`). Everything else is pure:
`models` (CRD schema source), `builders` (child manifests), `rollout` (the draft state machine),
`status` (validation and conditions); `kube` and `redis_io` are the two adapters.
"""
