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
{{- /* Metrics reach Prometheus one way (telemetry.metrics): pushed over
OTLP only when asked, so a scraped pod is not also counted through the
collector. */}}
- name: OTEL_METRICS_EXPORTER
  value: {{ ternary "none" "otlp" (eq (include "correu.metricsSource" $) "scrape") | quote }}
{{- /* Logs go to standard error (the cluster's log collector) and, with
telemetry.logs = otlp, also as OTLP log records. */}}
- name: OTEL_LOGS_EXPORTER
  value: {{ ternary "otlp" "none" (eq (.logs | default "stderr") "otlp") | quote }}
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
{{- with $.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with (index $.Values $component).extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* What must be set, checked before anything is rendered: helm install
fails with the value to set instead of leaving pods that exit 64. */}}
{{- define "correu.validate" -}}
{{- $_ := include "correu.metricsSource" . -}}
{{- if not (or .Values.rabbitmq.url .Values.rabbitmq.existingSecret .Values.rabbitmq.internal.enabled) -}}
{{- fail "Correu needs RabbitMQ 3.10 or later: set rabbitmq.existingSecret (a Secret whose key `url` holds amqp(s)://USER:PASSWORD@HOST:PORT/VHOST), rabbitmq.url, or rabbitmq.internal.enabled=true for a trial" -}}
{{- end -}}
{{- if and (gt (int .Values.storage.replicas) 1) (not (has "ReadWriteMany" .Values.storage.persistence.accessModes)) -}}
{{- fail (printf "storage.replicas is %d but storage.persistence.accessModes has no ReadWriteMany: several storage pods need one shared volume (or set storage.replicas=1)" (int .Values.storage.replicas)) -}}
{{- end -}}
{{- if and .Values.webhook.enabled (not .Values.webhook.urls) -}}
{{- fail "webhook.enabled needs webhook.urls: the http:// or https:// URLs delivery events are posted to" -}}
{{- end -}}
{{- if and .Values.storage.dovecot.enabled (not .Values.accounts.existingSecret) -}}
{{- fail "storage.dovecot.enabled needs accounts.existingSecret: Dovecot checks IMAP passwords against Correu's accounts" -}}
{{- end -}}
{{- end -}}

{{/* telemetry.metrics, checked: scrape, otlp or both. */}}
{{- define "correu.metricsSource" -}}
{{- $m := .Values.telemetry.metrics | default "scrape" -}}
{{- if not (has $m (list "scrape" "otlp" "both")) -}}
{{- fail (printf "telemetry.metrics is %q: say scrape (Prometheus reads /metrics), otlp (pushed to telemetry.otlpEndpoint) or both" $m) -}}
{{- end -}}
{{- if and (ne $m "scrape") (not .Values.telemetry.otlpEndpoint) -}}
{{- fail (printf "telemetry.metrics=%s pushes metrics over OTLP and needs telemetry.otlpEndpoint (e.g. http://otel-collector.monitoring:4317), or set telemetry.metrics=scrape" $m) -}}
{{- end -}}
{{- $m -}}
{{- end -}}

{{/* Whether the ServiceMonitor (and its headless Services) is rendered:
asked for, and metrics are scraped (telemetry.metrics scrape or both). */}}
{{- define "correu.serviceMonitor" -}}
{{- if and .Values.telemetry.serviceMonitor.enabled (ne (include "correu.metricsSource" .) "otlp") -}}
true
{{- end -}}
{{- end -}}

{{/* The label matchers every Correu series in the PrometheusRule gets:
telemetry.prometheusRule.selector, else this release's scrape jobs (the
headless Services the ServiceMonitor makes), else none (otlp). */}}
{{- define "correu.ruleSelector" -}}
{{- $p := .Values.telemetry.prometheusRule -}}
{{- if $p.selector -}}
{{- $p.selector -}}
{{- else if ne (include "correu.metricsSource" .) "otlp" -}}
namespace="{{ .Release.Namespace }}", job=~"{{ include "correu.fullname" . }}-(ingress|delivery|storage|webhook)-metrics"
{{- end -}}
{{- end -}}

{{/* One series selector for the PrometheusRule: include with
(list $ "correu_queue_errors_total" `operation="publish"`) (the third,
more matchers, may be ""). */}}
{{- define "correu.series" -}}
{{- $ := index . 0 -}}
{{- $matchers := list -}}
{{- with include "correu.ruleSelector" $ }}{{ $matchers = append $matchers . }}{{ end -}}
{{- with index . 2 }}{{ $matchers = append $matchers . }}{{ end -}}
{{ index . 1 }}{{ "{" }}{{ join ", " $matchers }}{{ "}" }}
{{- end -}}

{{- define "correu.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "correu.fullname" .) -}}
{{- end -}}

{{/* A Secret's data as the cluster has it now (empty in helm template
and dry runs), so a rotated Secret changes the pods that read it. */}}
{{- define "correu.secretDigest" -}}
{{- $ := index . 0 -}}
{{- $name := index . 1 -}}
{{- if $name -}}
{{- (lookup "v1" "Secret" $.Release.Namespace $name).data | default dict | toJson | sha256sum -}}
{{- end -}}
{{- end -}}

{{/* The rollout checksums of one component: the settings it reads and
the Secrets it mounts or takes variables from. Include with (list $ "ingress"). */}}
{{- define "correu.checksums" -}}
{{- $ := index . 0 -}}
{{- $c := index . 1 -}}
{{- $config := include "correu.config" $ | fromToml -}}
{{- $shared := dict "hostname" $config.hostname "domains" $config.domains "telemetry" $config.telemetry -}}
{{- $secrets := list -}}
{{- if eq $c "ingress" -}}
{{- $_ := set $shared "smtp" $config.smtp -}}
{{- $_ := set $shared "queue" $config.queue -}}
{{- $_ := set $shared "redis" $config.redis -}}
{{- $_ := set $shared "inbound" $config.inbound -}}
{{- $_ := set $shared "dkim" $config.delivery.dkim -}}
{{- $_ := set $shared "storage" (pick $config.storage "endpoint" "request_timeout" "srs_secret_file") -}}
{{- $secrets = list $.Values.rabbitmq.existingSecret $.Values.redis.existingSecret $.Values.tls.existingSecret $.Values.dkim.existingSecret $.Values.srs.existingSecret -}}
{{- else if eq $c "delivery" -}}
{{- $_ := set $shared "delivery" $config.delivery -}}
{{- $_ := set $shared "queue" $config.queue -}}
{{- $_ := set $shared "redis" $config.redis -}}
{{- $_ := set $shared "storage" (pick $config.storage "endpoint" "request_timeout") -}}
{{- $_ := set $shared "events" $config.events -}}
{{- $_ := set $shared "webhook" (pick ($config.webhook | default dict) "urls") -}}
{{- $secrets = list $.Values.rabbitmq.existingSecret $.Values.redis.existingSecret $.Values.dkim.existingSecret -}}
{{- else if eq $c "webhook" -}}
{{- $_ := set $shared "webhook" $config.webhook -}}
{{- $_ := set $shared "queue" $config.queue -}}
{{- $_ := set $shared "redis" $config.redis -}}
{{- $secrets = list $.Values.rabbitmq.existingSecret $.Values.redis.existingSecret $.Values.webhook.existingSecret -}}
{{- else -}}
{{- $_ := set $shared "storage" $config.storage -}}
{{- $_ := set $shared "smtp" (pick $config.smtp "max_message_size") -}}
{{- $secrets = list $.Values.accounts.existingSecret $.Values.tls.existingSecret -}}
{{- end -}}
checksum/config: {{ $shared | toJson | sha256sum }}
{{- $digests := list -}}
{{- range $secrets -}}
{{- $digests = append $digests (include "correu.secretDigest" (list $ .)) -}}
{{- end }}
checksum/secrets: {{ $digests | join "," | sha256sum }}
{{- end -}}

{{/* A component's pod metadata: selector labels, podLabels, checksums and
podAnnotations. Include with (list $ "ingress"). */}}
{{- define "correu.podMetadata" -}}
{{- $ := index . 0 -}}
{{- $v := index $.Values (index . 1) -}}
labels:
  {{- include "correu.selector" . | nindent 2 }}
  {{- with merge (dict) ($v.podLabels | default dict) $.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  {{- include "correu.checksums" . | nindent 2 }}
  {{- with merge (dict) ($v.podAnnotations | default dict) $.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* What every Correu pod spec starts with. Include with (list $ "ingress"). */}}
{{- define "correu.podCommon" -}}
{{- $ := index . 0 -}}
{{- $v := index $.Values (index . 1) -}}
serviceAccountName: {{ include "correu.serviceAccountName" $ }}
automountServiceAccountToken: false
# Service links would put a variable per Service and port into every
# container (CORREU_INGRESS_PORT=tcp://… in a release named correu);
# Correu finds its peers by DNS.
enableServiceLinks: false
securityContext:
  {{- toYaml $.Values.podSecurityContext | nindent 2 }}
{{- with ($v.priorityClassName | default $.Values.priorityClassName) }}
priorityClassName: {{ . }}
{{- end }}
{{- with $.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml $v.topologySpreadConstraints | nindent 2 }}
{{- else if $v.topologySpread }}
{{- include "correu.spread" . }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A component's PodDisruptionBudget. Include with (list $ "ingress"). */}}
{{- define "correu.pdb" -}}
{{- $ := index . 0 -}}
{{- $c := index . 1 -}}
{{- $pdb := (index $.Values $c).pdb -}}
{{- if $pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "correu.fullname" $ }}-{{ $c }}
  labels:
    {{- include "correu.labels" $ | nindent 4 }}
    app.kubernetes.io/component: {{ $c }}
spec:
  {{- if not (kindIs "invalid" $pdb.minAvailable) }}
  minAvailable: {{ $pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $pdb.maxUnavailable | default 1 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "correu.selector" . | nindent 6 }}
{{- end }}
{{- end -}}

{{/* Volume mounts every Correu container has. */}}
{{- define "correu.commonMounts" -}}
- {name: config, mountPath: /etc/correu/correu.toml, subPath: correu.toml, readOnly: true}
- {name: tmp, mountPath: /tmp}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes every Correu pod has. */}}
{{- define "correu.commonVolumes" -}}
- name: config
  configMap: {name: {{ include "correu.fullname" . }}-config}
- name: tmp
  emptyDir: {sizeLimit: 64Mi}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
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
{{- define "correu.spread" }}
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
{{- $smtp := dict "listen" (list "0.0.0.0:2525") "shutdown_grace" (printf "%ds" (int .Values.ingress.drainSeconds)) "drain_delay" (printf "%ds" (int .Values.ingress.drainDelaySeconds)) -}}
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
{{- if .Values.srs.existingSecret -}}
{{- $_ := set $storage "srs_secret_file" "/etc/correu/srs/secret" -}}
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
{{- if .Values.webhook.enabled -}}
{{- $webhook := dict "urls" .Values.webhook.urls -}}
{{- if .Values.webhook.existingSecret -}}
{{- $_ := set $webhook "secret_file" "/etc/correu/webhook/secret" -}}
{{- end -}}
{{- $_ := set $base "webhook" $webhook -}}
{{- end -}}
{{- $merged := mustMergeOverwrite $base (deepCopy .Values.config) -}}
{{- $_ := include "correu.ints" $merged -}}
{{- $merged | toToml -}}
{{- end -}}
