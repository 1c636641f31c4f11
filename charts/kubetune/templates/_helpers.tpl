{{/* Names, labels and shared fragments of the kubetune chart. */}}

{{/* The chart name, or nameOverride. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: <release>-<chart>, or the release name when it already holds the chart name. */}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/*
Selector of the operator pods. The component label keeps trainer pods (also app.kubernetes.io/name=kubetune, but
component=trainer and no instance label) out of the operator's Deployment and Service.
*/}}
{{- define "kubetune.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.operatorLabels" -}}
{{ include "kubetune.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- /* repository@digest when a digest is set (immutable: what was tested is what runs), else repository:tag. */}}
{{- define "kubetune.imageReference" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "kubetune.operatorImage" -}}
{{- include "kubetune.imageReference" (dict "image" .Values.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "kubetune.trainerImage" -}}
{{- include "kubetune.imageReference" (dict "image" .Values.trainer.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{/* "true" when the operator replicas run with kopf peering: asked for, or implied by more than one replica. */}}
{{- define "kubetune.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicas) 1) }}true{{ end }}
{{- end }}

{{/* "true" when monitoring.coreos.com/v1 <kind> may be rendered: the cluster serves it, or the check is skipped. */}}
{{- define "kubetune.monitoringApi" -}}
{{- $root := index . 0 }}
{{- $kind := index . 1 }}
{{- if or $root.Values.monitoring.skipCapabilityCheck ($root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" $kind)) }}true{{ end }}
{{- end }}

{{/*
The operator's RBAC rules, shared by the ClusterRole and the per-namespace Roles. They must equal
operator_rbac_rules() in operator/kubetune_operator/rbac.py (tests/unit/test_chart.py compares them).
No Secrets (passed to trainers by reference), no CRDs or namespaces (kopf's scanning is off), no delete (children
go by owner-reference garbage collection).
*/}}
{{- define "kubetune.operatorRules" -}}
# kopf lists and watches FineTuneJobs; handlers re-read one before deriving its status; kopf patches
# metadata.annotations to keep its handler progress and the last handled spec.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch"]
# Phase, conditions and results go through the status subresource. Holding patch here is also what lets the
# operator bind the trainer ClusterRole (patch on this) in a namespace: RBAC refuses to grant what one lacks.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# kopf.adopt sets blockOwnerDeletion on children; OwnerReferencesPermissionEnforcement allows that only to who may
# update the owner's finalizers (the operator never sets finalizers itself).
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
# The trainer Job: created once, watched for its conditions, patched for spec.suspend.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# A multi-node trainer's JobSet (resources.nodes > 1), the same way; JobSet itself creates its Jobs and pods.
- apiGroups: ["jobset.x-k8s.io"]
  resources: ["jobsets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Kueue's Workloads are only read: why a queued trainer waits, or that it was preempted.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "watch"]
# Trainer pods are only read: scheduling, image-pull and OOM failures, and the termination-message summary.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# The trainer identity, once per namespace: the ServiceAccount trainer pods run as. Created (an existing one is
# success) and watched, by its labels, so that one deleted is created again.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["list", "watch", "create"]
# ... and its RoleBinding to the trainer ClusterRole (templates/trainer-rbac.yaml), the same way.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["rolebindings"]
  verbs: ["list", "watch", "create"]
# spec.serving's endpoint, once the job succeeded: its Deployment, read back when it exists and watched for its
# ready replicas and its deletion.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create"]
# ... and the Service in front of it (read back when it exists).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create"]
# Events on FineTuneJobs for every phase transition, and kopf's own handler reports.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# kopf peering: replicas find each other and keep alive through these objects' status; the operator creates its
# peering object at start.
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings", "kopfpeerings"]
  verbs: ["get", "list", "watch", "patch", "create"]
{{- end }}

{{/*
A CRD file from files/crds as objects, with the release's labels and, when keep is set, helm.sh/resource-policy:
keep. Takes (list $root "<file>" $keep). The files are byte copies of crds/ and operator/.../peering.yaml written by
`make crds`; they are parsed and re-serialised so that labels and annotations can be added.
*/}}
{{- define "kubetune.crdsFromFile" -}}
{{- $root := index . 0 }}
{{- $file := index . 1 }}
{{- $keep := index . 2 }}
{{- $labels := include "kubetune.labels" $root | fromYaml }}
{{- $text := $root.Files.Get (printf "files/crds/%s" $file) }}
{{- if not $text }}
{{- fail (printf "files/crds/%s is missing from the chart: run `make crds`" $file) }}
{{- end }}
{{- range $document := regexSplit "(?m)^---[ \t]*$" $text -1 }}
{{- $crd := fromYaml $document }}
{{- if hasKey $crd "Error" }}
{{- fail (printf "files/crds/%s does not parse: %s" $file $crd.Error) }}
{{- end }}
{{- if $crd.kind }}
{{- $metadata := $crd.metadata }}
{{- $_ := set $metadata "labels" (merge (default (dict) $metadata.labels) $labels) }}
{{- if $keep }}
{{- $_ := set $metadata "annotations" (merge (default (dict) $metadata.annotations) (dict "helm.sh/resource-policy" "keep")) }}
{{- end }}
---
{{ toYaml $crd }}
{{- end }}
{{- end }}
{{- end }}

{{/* The trainer ClusterRole's name (KUBETUNE_TRAINER_CLUSTER_ROLE). */}}
{{- define "kubetune.trainerClusterRole" -}}
{{- printf "%s-trainer" (include "kubetune.fullname" .) }}
{{- end }}

{{/* The trainer admission policy's name, and its binding's. */}}
{{- define "kubetune.trainerPolicy" -}}
{{- printf "%s-trainer-own-job" (include "kubetune.fullname" .) }}
{{- end }}
