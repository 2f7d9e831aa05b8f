{{/* Names and labels. */}}
{{- define "correu.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "correu.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: include with (list $ "ingress"). */}}
{{- define "correu.selector" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ $.Chart.Name }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "correu.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "correu.rabbitmqUrl" -}}
{{- if .Values.rabbitmq.internal.enabled -}}
amqp://correu:correu@{{ include "correu.fullname" . }}-rabbitmq:5672/%2f
{{- else -}}
{{ .Values.rabbitmq.url }}
{{- end -}}
{{- end -}}

{{- define "correu.redisUrl" -}}
{{- if .Values.redis.internal.enabled -}}
redis://{{ include "correu.fullname" . }}-redis:6379
{{- else -}}
{{ .Values.redis.url }}
{{- end -}}
{{- end -}}

{{/* The container security every Correu container gets. */}}
{{- define "correu.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Environment shared by every Correu container: include with (list $ "ingress"). */}}
{{- define "correu.env" -}}
{{- $ := index . 0 -}}
{{- $component := index . 1 -}}
- name: CORREU_LOG
  value: {{ $.Values.logLevel | quote }}
- name: CORREU_LOG_FORMAT
  value: json
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
- name: OTEL_SERVICE_NAME
  value: correu-{{ $component }}
{{- with $.Values.telemetry }}
{{- if .otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .otlpEndpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .otlpProtocol | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .tracesSampler | quote }}
{{- if .tracesSamplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .tracesSamplerArg | quote }}
{{- end }}
{{- end }}
{{- if .resourceAttributes }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ .resourceAttributes | quote }}
{{- end }}
{{- end }}
{{- if ne $component "storage" }}
{{- if $.Values.rabbitmq.existingSecret }}
- name: CORREU_QUEUE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.rabbitmq.existingSecret }}
      key: {{ $.Values.rabbitmq.existingSecretKey }}
{{- else }}
- name: CORREU_QUEUE_URL
  value: {{ include "correu.rabbitmqUrl" $ | quote }}
{{- end }}
{{- if $.Values.redis.existingSecret }}
- name: CORREU_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.redis.existingSecret }}
      key: {{ $.Values.redis.existingSecretKey }}
{{- else if (include "correu.redisUrl" $) }}
- name: CORREU_REDIS_URL
  value: {{ include "correu.redisUrl" $ | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Probes on the telemetry port. */}}
{{- define "correu.probes" -}}
livenessProbe:
  httpGet: {path: /livez, port: health}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: health}
  periodSeconds: 5
  failureThreshold: 2
startupProbe:
  httpGet: {path: /livez, port: health}
  periodSeconds: 2
  failureThreshold: 30
{{- end -}}

{{/* Spread a component's pods over nodes and zones. */}}
{{- define "correu.spread" -}}
{{- $ := index . 0 -}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "correu.selector" . | nindent 8 }}
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "correu.selector" . | nindent 8 }}
{{- end -}}

{{/* YAML numbers arrive as floats; whole ones become integers again, in
place, so toToml writes 52428800 and not 5.24288e+07. */}}
{{- define "correu.ints" -}}
{{- $m := . -}}
{{- range $k, $v := $m -}}
{{- if kindIs "map" $v -}}
{{- include "correu.ints" $v -}}
{{- else if kindIs "float64" $v -}}
{{- if eq (float64 (int64 $v)) $v -}}
{{- $_ := set $m $k (int64 $v) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* correu.toml, as a dict: what the chart sets, then .Values.config over it. */}}
{{- define "correu.config" -}}
{{- $smtp := dict "listen" (list "0.0.0.0:2525") "shutdown_grace" (printf "%ds" (int .Values.ingress.drainSeconds)) -}}
{{- if .Values.tls.existingSecret -}}
{{- $_ := set $smtp "submission" (list "0.0.0.0:2587") -}}
{{- $_ := set $smtp "submissions" (list "0.0.0.0:2465") -}}
{{- $_ := set $smtp "tls_certificate" "/etc/correu/tls/tls.crt" -}}
{{- $_ := set $smtp "tls_key" "/etc/correu/tls/tls.key" -}}
{{- end -}}
{{- if .Values.ingress.proxyProtocol.enabled -}}
{{- $_ := set $smtp "proxy_networks" .Values.ingress.proxyProtocol.networks -}}
{{- end -}}
{{- $storage := dict "listen" "0.0.0.0:2526" "endpoint" (printf "http://%s-storage:2526" (include "correu.fullname" .)) "root" "/var/lib/correu/mail" -}}
{{- if .Values.accounts.existingSecret -}}
{{- $_ := set $storage "accounts_file" "/etc/correu/accounts/accounts" -}}
{{- if .Values.accounts.aliases -}}
{{- $_ := set $storage "aliases_file" "/etc/correu/accounts/aliases" -}}
{{- end -}}
{{- end -}}
{{- $delivery := dict -}}
{{- if .Values.dkim.domains -}}
{{- $dkim := dict -}}
{{- range $domain, $d := .Values.dkim.domains -}}
{{- $_ := set $dkim $domain (dict "selector" $d.selector "key_file" (printf "/etc/correu/dkim/%s" $d.key) "algorithm" ($d.algorithm | default "rsa-sha256")) -}}
{{- end -}}
{{- $_ := set $delivery "dkim" $dkim -}}
{{- end -}}
{{- $base := dict "hostname" .Values.hostname "domains" .Values.domains "smtp" $smtp "storage" $storage "delivery" $delivery "queue" (dict "backend" "rabbitmq") "telemetry" (dict "listen" "0.0.0.0:9725") -}}
{{- $merged := mustMergeOverwrite $base (deepCopy .Values.config) -}}
{{- $_ := include "correu.ints" $merged -}}
{{- $merged | toToml -}}
{{- end -}}
