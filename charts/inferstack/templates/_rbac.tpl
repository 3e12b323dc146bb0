{{/*
RBAC rules: exactly the calls the operator makes, as declared in
operator/inferstack_operator/rbac.py (tests/chart/test_chart_rbac.py keeps them equal and
checks them against the requests the operator's code sends).
*/}}

{{/* Namespaced resources: in a ClusterRole (all namespaces) or a Role per watched namespace. */}}
{{- define "inferstack.rbac.namespacedRules" -}}
# The InferenceService: kopf lists/watches it and patches its finalizer and progress annotations;
# child_changed reads the owner.
- apiGroups: ["inferstack.dev"]
  resources: ["inferenceservices"]
  verbs: ["get", "list", "watch", "patch"]
# Status is written as a merge patch on the subresource.
- apiGroups: ["inferstack.dev"]
  resources: ["inferenceservices/status"]
  verbs: ["patch"]
# Children carry an ownerReference with blockOwnerDeletion; clusters with the
# OwnerReferencesPermissionEnforcement admission plugin require this for it.
- apiGroups: ["inferstack.dev"]
  resources: ["inferenceservices/finalizers"]
  verbs: ["update"]
# Children: get to detect drift, server-side apply (patch; create when missing) to create or update;
# list/watch so their status changes refresh the owner's status.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Redis and front-door Services, and the shared ConfigMap: same as above, not watched.
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "create", "patch"]
# The Redis auth Secret <name>-redis-auth (read back so passwords survive resyncs) and the
# NetworkPolicies <name>-redis / <name>-web. get by name only: no list or watch of Secrets.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch"]
# Autoscalers (HPA for web, KEDA for workers) and PodMonitors: optional children, deleted again
# when the spec stops asking for them.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects", "triggerauthentications"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["podmonitors"]
  verbs: ["get", "create", "patch", "delete"]
# pvc:// model locations must exist before the worker is created; read only.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
# Pods of a workload that is not ready: why (Unschedulable, image pulls, crash loops) goes
# into the Ready condition. Listed by label, never read one by one.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# kopf.info()/kopf.warn() and kopf's own handler events.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* Cluster-wide mode only: kopf scans CRDs (namespaced mode turns scanning off). */}}
{{- define "inferstack.rbac.clusterRules" -}}
# kopf lists and watches CRDs to notice the InferenceService CRD appear or go.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}
