"""Pure decisions shared by the operator and the trainer (no Kubernetes client, no torch)."""
