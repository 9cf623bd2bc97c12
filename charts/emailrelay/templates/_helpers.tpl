{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "emailrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: release-chart, or the release name alone when it
already contains the chart name.
*/}}
{{- define "emailrelay.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "emailrelay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "emailrelay.labels" -}}
helm.sh/chart: {{ include "emailrelay.chart" . }}
{{ include "emailrelay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: emailrelay
{{- end }}

{{/*
Selector labels (immutable on a Deployment: never add to them).
*/}}
{{- define "emailrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "emailrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the service account to use.
*/}}
{{- define "emailrelay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "emailrelay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Container image reference: repository@digest, or repository:tag (tag
defaults to the appVersion).
*/}}
{{- define "emailrelay.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding SMTP credentials / SES settings, or "" when no
Secret is in use. Fails on contradictory settings.
*/}}
{{- define "emailrelay.secretName" -}}
{{- if and .Values.secret.existingSecret .Values.externalSecret.enabled }}
{{- fail "secret.existingSecret and externalSecret.enabled are mutually exclusive" }}
{{- end }}
{{- if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else if or .Values.externalSecret.enabled .Values.secret.create }}
{{- include "emailrelay.fullname" . }}
{{- end }}
{{- end }}

{{/*
The HTTP port the container listens on (config.http.port, default 8080).
*/}}
{{- define "emailrelay.port" -}}
{{- $port := 8080 }}
{{- if and .Values.config.http (not (kindIs "invalid" .Values.config.http.port)) }}
{{- $port = .Values.config.http.port }}
{{- end }}
{{- $port | int }}
{{- end }}

{{/*
SHUTDOWN_GRACE_SECONDS as an int (application default 25).
*/}}
{{- define "emailrelay.shutdownGraceSeconds" -}}
{{- if kindIs "invalid" .Values.config.shutdownGraceSeconds }}
{{- 25 }}
{{- else }}
{{- .Values.config.shutdownGraceSeconds | int }}
{{- end }}
{{- end }}

{{/*
Render a scalar as an environment variable value: integral numbers without
an exponent (values arrive as float64), everything else as its string form.
*/}}
{{- define "emailrelay.envValue" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}
{{- int64 . | toString | quote }}
{{- else }}
{{- toString . | quote }}
{{- end }}
{{- end }}

{{/*
Environment variables rendered from `config`, as a list of [NAME, value]
pairs. A null (or removed) value is left out; "" is kept.
*/}}
{{- define "emailrelay.configEnv" -}}
{{- $c := .Values.config }}
{{- $nats := $c.nats | default dict }}
{{- $http := $c.http | default dict }}
{{- $email := $c.email | default dict }}
{{- $smtp := $c.smtp | default dict }}
{{- $ses := $c.ses | default dict }}
{{- $limits := $c.limits | default dict }}
{{- $events := $c.events | default dict }}
{{- $log := $c.log | default dict }}
{{- $aws := $c.aws | default dict }}
{{- $pairs := list
  (list "NATS_URL" $nats.url)
  (list "NATS_CONNECT_TIMEOUT" $nats.connectTimeout)
  (list "KV_REPLICAS" $nats.kvReplicas)
  (list "KV_AUTO_CREATE" $nats.kvAutoCreate)
  (list "PORT" $http.port)
  (list "HTTP_HOST" $http.host)
  (list "EMAIL_ENABLED" $email.enabled)
  (list "EMAIL_TRANSPORT" $email.transport)
  (list "SUPPRESSION_ENABLED" $email.suppressionEnabled)
  (list "SMTP_HOST" $smtp.host)
  (list "SMTP_PORT" $smtp.port)
  (list "SMTP_TLS_MODE" $smtp.tlsMode)
  (list "SMTP_POOL_SIZE" $smtp.poolSize)
  (list "SMTP_MAX_SEND_RATE" $smtp.maxSendRate)
  (list "SMTP_CONNECTION_MAX_MESSAGES" $smtp.connectionMaxMessages)
  (list "SMTP_CONNECTION_MAX_AGE" $smtp.connectionMaxAge)
  (list "DEFAULT_SMTP_FROM" $smtp.defaultFrom)
  (list "DEFAULT_SMTP_FROM_DISPLAY_NAME" $smtp.defaultFromDisplayName)
  (list "SMTP_ALLOWED_FROM_DOMAINS" $smtp.allowedFromDomains)
  (list "SMTP_ALLOWED_REPLY_TO_DOMAINS" $smtp.allowedReplyToDomains)
  (list "SMTP_ALLOWED_RECIPIENT_DOMAINS" $smtp.allowedRecipientDomains)
  (list "SES_CONFIGURATION_SET" $ses.configurationSet)
  (list "SES_EVENTING_ENABLED" $ses.eventingEnabled)
  (list "SES_ENGAGEMENT_SQS_QUEUE_URL" $ses.engagementSqsQueueUrl)
  (list "SES_EVENT_MAX_RECEIVES" $ses.eventMaxReceives)
  (list "EVENTS_STREAM_ENABLED" $events.streamEnabled)
  (list "EVENTS_MAX_AGE" $events.maxAge)
  (list "EVENTS_MAX_BYTES" $events.maxBytes)
  (list "EVENTS_DUPLICATE_WINDOW" $events.duplicateWindow)
  (list "MAX_IN_FLIGHT" $limits.maxInFlight)
  (list "MAX_BACKLOG" $limits.maxBacklog)
  (list "MAX_READS_IN_FLIGHT" $limits.maxReadsInFlight)
  (list "SEND_TIMEOUT" $limits.sendTimeout)
  (list "TRACKING_WAIT" $limits.trackingWait)
  (list "IDEMPOTENCY_TTL" $limits.idempotencyTtl)
  (list "RETENTION" $limits.retention)
  (list "SUPPRESSION_RETENTION" $limits.suppressionRetention)
  (list "SHUTDOWN_GRACE_SECONDS" $c.shutdownGraceSeconds)
  (list "LOG_LEVEL" $log.level)
  (list "LOG_FORMAT" $log.format)
  (list "LOG_ADD_SOURCE" $log.addSource)
  (list "AWS_REGION" $aws.region)
  (list "AWS_ENDPOINT_URL_SQS" $aws.endpointUrlSqs)
  (list "AWS_ENDPOINT_URL_SESV2" $aws.endpointUrlSesv2)
}}
{{- toJson $pairs }}
{{- end }}

{{/*
The container's env list: config variables (minus those taken from the
Secret or overridden in extraEnv), the Secret references, NATS_CREDS, then
extraEnv.
*/}}
{{- define "emailrelay.env" -}}
{{- $secretName := include "emailrelay.secretName" . }}
{{- $secretEnv := dict }}
{{- if $secretName }}
{{- $secretEnv = .Values.secret.env | default dict }}
{{- end }}
{{- $extraNames := dict }}
{{- range .Values.extraEnv }}
{{- $_ := set $extraNames .name true }}
{{- end }}
{{- $tls := .Values.config.smtp.tlsMode }}
{{- if and (not (kindIs "invalid" $tls)) (not (has (toString $tls) (list "" "auto" "implicit" "starttls" "none"))) }}
{{- fail (printf "config.smtp.tlsMode must be one of auto, implicit, starttls, none (got %q)" (toString $tls)) }}
{{- end }}
{{- range $pair := include "emailrelay.configEnv" . | fromJsonArray }}
{{- $name := index $pair 0 }}
{{- $value := index $pair 1 }}
{{- if and (not (kindIs "invalid" $value)) (not (hasKey $secretEnv $name)) (not (hasKey $extraNames $name)) }}
- name: {{ $name }}
  value: {{ include "emailrelay.envValue" $value }}
{{- end }}
{{- end }}
{{- range $name, $key := $secretEnv }}
{{- if not (hasKey $extraNames $name) }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $secretName }}
      key: {{ $key }}
      {{- if $.Values.secret.optional }}
      optional: true
      {{- end }}
{{- end }}
{{- end }}
{{- if and .Values.natsCreds.enabled (not (hasKey $extraNames "NATS_CREDS")) }}
- name: NATS_CREDS
  value: {{ printf "%s/%s" (trimSuffix "/" .Values.natsCreds.mountPath) .Values.natsCreds.key | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The NATS permissions the relay's user needs, and nothing more, as a JSON
object in nats-server's `permissions` syntax (JSON is valid NATS config):
- subscribe: the three contract subjects in the queue group only, NATS
  service discovery for the name "emailrelay", and inboxes (replies to its
  own JetStream requests);
- publish: the JetStream API of the two buckets' streams (info, direct and
  message gets, create when KV_AUTO_CREATE is on) and their `$KV` subjects;
- allow_responses: replies go to the reply subject of a request it received,
  once, instead of a publish grant on every `_INBOX` (no spoofed replies).
Proven by tests/test_nats_permissions.py against a server enforcing it.
*/}}
{{- define "emailrelay.natsPermissions" -}}
{{- $queue := "lfx.email-service.queue" }}
{{- $subscribe := list }}
{{- range $subject := list "lfx.email-service.send_email" "lfx.email-service.get_email_status" "lfx.email-service.get_email_engagement_analytics" "lfx.email-service.suppression.get" "lfx.email-service.suppression.list" "lfx.email-service.suppression.add" "lfx.email-service.suppression.remove" "lfx.email-service.erase_recipient_data" }}
{{- $subscribe = append $subscribe (printf "%s %s" $subject $queue) }}
{{- end }}
{{- $subscribe = concat $subscribe (list "$SRV.PING" "$SRV.INFO" "$SRV.STATS" "$SRV.*.emailrelay" "$SRV.*.emailrelay.*" "_INBOX.>") }}
{{- $publish := list }}
{{- $autoCreate := true }}
{{- if not (kindIs "invalid" .Values.config.nats.kvAutoCreate) }}
{{- $autoCreate = .Values.config.nats.kvAutoCreate }}
{{- end }}
{{- /* email-idempotency (issue 11, always opened) and email-suppressions (SUPPRESSION_ENABLED) are fixed names */}}
{{- /* email-recipient-index (erasure by recipient) is a fixed name too */}}
{{- range $bucket := list .Values.kv.buckets.recipients.bucket .Values.kv.buckets.groupIndex.bucket "email-idempotency" "email-suppressions" "email-recipient-index" }}
{{- $stream := printf "KV_%s" $bucket }}
{{- $publish = append $publish (printf "$JS.API.STREAM.INFO.%s" $stream) }}
{{- if $autoCreate }}
{{- $publish = append $publish (printf "$JS.API.STREAM.CREATE.%s" $stream) }}
{{- end }}
{{- $publish = concat $publish (list (printf "$JS.API.DIRECT.GET.%s" $stream) (printf "$JS.API.DIRECT.GET.%s.>" $stream) (printf "$JS.API.STREAM.MSG.GET.%s" $stream) (printf "$KV.%s.>" $bucket)) }}
{{- end }}
{{- /* EMAIL_EVENTS (EVENTS_STREAM_ENABLED): publish events (JetStream acknowledges on _INBOX), look the stream up, create it */}}
{{- if (.Values.config.events | default dict).streamEnabled }}
{{- $publish = concat $publish (list "lfx.email-service.events.>" "$JS.API.STREAM.INFO.EMAIL_EVENTS") }}
{{- if $autoCreate }}
{{- $publish = append $publish "$JS.API.STREAM.CREATE.EMAIL_EVENTS" }}
{{- end }}
{{- end }}
{{- $perms := .Values.natsPermissions }}
{{- $publish = concat $publish ($perms.extraPublish | default list) }}
{{- $subscribe = concat $subscribe ($perms.extraSubscribe | default list) }}
{{- toRawJson (dict "publish" (dict "allow" $publish) "subscribe" (dict "allow" $subscribe) "allow_responses" true) }}
{{- end }}
