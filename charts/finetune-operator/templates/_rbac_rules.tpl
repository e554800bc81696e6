{{/*
The operator's permissions, split by scope. They must equal what the code calls
(finetune_operator.kube.permissions.OPERATOR_PERMISSIONS) plus what the per-job trainer Role
grants (a Role can only grant what its creator holds): tests/ship/test_ship_rbac.py renders this
chart and fails on any difference, in either direction.
*/}}

{{/* Namespaced resources: a ClusterRole cluster-wide, or a Role in each watched namespace. */}}
{{- define "fto.namespacedRules" -}}
# FineTuneJobs: kopf lists/watches them (every read comes from that watch); the trainer's Role needs get/watch.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch"]
# Status only (merge patch); the operator never writes a FineTuneJob's spec or metadata.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# FineTuneSweeps: watched, status merge-patched; their trials are FineTuneJobs the operator creates, reads
# once after a 409 and stops by a merge patch of the stop annotations.
- apiGroups: ["finetune.dev"]
  resources: ["finetunesweeps"]
  verbs: ["list", "watch"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunesweeps/status"]
  verbs: ["patch"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["create", "patch"]
# Children: watched into a cache, created when missing, server-side applied (patch) when they differ, read
# (get) only after a create answered 409; a Job whose template changed before it started is re-created.
- apiGroups: [""]
  resources: ["configmaps", "services", "serviceaccounts", "persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Pods: watched for phases and failure reasons, never written.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if include "fto.peering" . }}
{{- if .Values.watchNamespaces }}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end }}
{{- end -}}

{{/* Cluster-scoped resources, always in a ClusterRole (kopf discovers CRDs and namespaces). */}}
{{- define "fto.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- if include "fto.peering" . }}
{{- if not .Values.watchNamespaces }}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end }}
{{- end -}}
