{{/* Names, labels and the checks that fail the render on bad input (values.schema.json catches the rest). */}}

{{- define "tide.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "tide.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "tide.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "tide.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; $component names the part (operator, redis, monitoring, dashboards). */}}
{{- define "tide.labels" -}}
{{- $ctx := index . 0 -}}
{{- $component := index . 1 -}}
helm.sh/chart: {{ printf "%s-%s" $ctx.Chart.Name $ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
{{ include "tide.selectorLabels" (list $ctx $component) }}
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tide.selectorLabels" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "tide.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "tide.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "tide.fullname" .)) .Values.serviceAccount.name -}}
{{- else if .Values.serviceAccount.name -}}
{{- .Values.serviceAccount.name -}}
{{- else -}}
{{- fail "serviceAccount.name: with serviceAccount.create=false, name the existing ServiceAccount the operator runs as" -}}
{{- end -}}
{{- end -}}

{{/* repository:tag (or @digest) of an image value; the tag defaults to the chart's appVersion. */}}
{{- define "tide.image" -}}
{{- $ctx := index . 0 -}}
{{- $img := index . 1 -}}
{{- if not $img.repository -}}
{{- fail (printf "%s.repository must not be empty" (index . 2)) -}}
{{- end -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default $ctx.Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{/* kopf run options after `python -m tide_operator` (the image's entry point). */}}
{{- define "tide.operatorArgs" -}}
{{- $op := .Values.operator -}}
- --log-format={{ $op.logFormat }}
{{- if ne $op.verbosity "normal" }}
- --{{ $op.verbosity }}
{{- end }}
- --liveness=http://0.0.0.0:{{ $op.healthPort }}/healthz
- --peering={{ include "tide.fullname" . }}
{{- if $op.watchNamespaces }}
{{- range $op.watchNamespaces }}
- --namespace={{ . }}
{{- end }}
{{- else }}
- --all-namespaces
{{- end }}
{{- end -}}

{{- define "tide.redisSecretName" -}}
{{- default (printf "%s-redis" (include "tide.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{- define "tide.redisUrl" -}}
{{- printf "redis://%s-redis.%s.svc:6379/0" (include "tide.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* Cross-field checks; called once from the operator Deployment so that every render runs them. */}}
{{- define "tide.validate" -}}
{{- $mon := .Values.monitoring -}}
{{- if and $mon.podMonitor.enabled $mon.serviceMonitor.enabled -}}
{{- fail "monitoring: enable podMonitor or serviceMonitor, not both (every TIDE series would be scraped twice)" -}}
{{- end -}}
{{- if and .Values.tideDeployments .Values.operator.watchNamespaces (not (has .Release.Namespace .Values.operator.watchNamespaces)) -}}
{{- fail (printf "tideDeployments are created in the release namespace %q, which operator.watchNamespaces %v does not include: the operator would never see them" .Release.Namespace .Values.operator.watchNamespaces) -}}
{{- end -}}
{{- range $name, $td := .Values.tideDeployments -}}
{{- include "tide.checkTideDeployment" (list $ $name $td.spec) -}}
{{- end -}}
{{- end -}}

{{- define "tide.checkTideDeployment" -}}
{{- $ctx := index . 0 -}}
{{- $name := index . 1 -}}
{{- $spec := index . 2 -}}
{{- range $required := list "model" "draft" "inference" -}}
{{- if not (hasKey $spec $required) -}}
{{- fail (printf "tideDeployments.%s.spec.%s is required (see docs/crds.md)" $name $required) -}}
{{- end -}}
{{- end -}}
{{- $redis := $spec.redis | default dict -}}
{{- $sources := 0 -}}
{{- if $redis.url }}{{ $sources = add1 $sources }}{{ end -}}
{{- if $redis.urlSecretRef }}{{ $sources = add1 $sources }}{{ end -}}
{{- if dig "managed" "enabled" false $redis }}{{ $sources = add1 $sources }}{{ end -}}
{{- if gt $sources 1 -}}
{{- fail (printf "tideDeployments.%s.spec.redis: set exactly one of url, urlSecretRef, managed.enabled" $name) -}}
{{- end -}}
{{- if and (eq $sources 0) (not $ctx.Values.redis.enabled) -}}
{{- fail (printf "tideDeployments.%s.spec.redis names no Redis: set url, urlSecretRef or managed.enabled, or enable the chart's redis (redis.enabled=true)" $name) -}}
{{- end -}}
{{- end -}}

{{/* The spec of a chart-rendered TideDeployment, with the chart's defaults filled in. */}}
{{- define "tide.tideDeploymentSpec" -}}
{{- $ctx := index . 0 -}}
{{- $spec := deepCopy (index . 1) -}}
{{- $inference := $spec.inference -}}
{{- if not $inference.image -}}
{{- $_ := set $inference "image" (include "tide.image" (list $ctx $ctx.Values.images.inference "images.inference")) -}}
{{- end -}}
{{- $training := $spec.training | default dict -}}
{{- if and (ne (toString (dig "enabled" true $training)) "false") (not $training.image) -}}
{{- $_ := set $training "image" (include "tide.image" (list $ctx $ctx.Values.images.trainer "images.trainer")) -}}
{{- $_ := set $spec "training" $training -}}
{{- end -}}
{{- $redis := $spec.redis | default dict -}}
{{- if and $ctx.Values.redis.enabled (not $redis.url) (not $redis.urlSecretRef) (not (dig "managed" "enabled" false $redis)) -}}
{{- $_ := set $redis "url" (include "tide.redisUrl" $ctx) -}}
{{- if $ctx.Values.redis.auth.enabled -}}
{{- $_ := set $redis "passwordSecretRef" (dict "name" (include "tide.redisSecretName" $ctx) "key" $ctx.Values.redis.auth.existingSecretKey) -}}
{{- end -}}
{{- $_ := set $spec "redis" $redis -}}
{{- end -}}
{{- toYaml $spec -}}
{{- end -}}

{{/* Pod labels to series labels: `deployment` (so sglang:* series filter like tide_* ones) and `role`. */}}
{{- define "tide.monitorRelabelings" -}}
- sourceLabels: [__meta_kubernetes_pod_label_tide_dev_deployment]
  targetLabel: deployment
- sourceLabels: [__meta_kubernetes_pod_label_app_kubernetes_io_component]
  targetLabel: component
{{- end -}}
