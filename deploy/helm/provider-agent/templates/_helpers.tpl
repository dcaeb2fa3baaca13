{{/* The chart's name, or nameOverride. */}}
{{- define "provider-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The objects' name: fullnameOverride, else <release>-<name> (just the release when it
already holds the name). */}}
{{- define "provider-agent.fullname" -}}
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

{{- define "provider-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "provider-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "provider-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "provider-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "provider-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "provider-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "provider-agent.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret with the API keys and the enrollment code: the operator's, or the chart's when
it has something to hold; empty when there is none. */}}
{{- define "provider-agent.secretName" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else if or .Values.apiKeys.values .Values.enrollmentCode }}
{{- include "provider-agent.fullname" . }}
{{- end }}
{{- end }}

{{/* What the pod needs to know from agent.toml, as JSON: the metrics port, the termination
grace period and the api_key_env names. Fails the render, naming the key, on a config the pod
could not run with: unparsable TOML, an endpoint the kubelet cannot reach, an identity key off
the state volume, an API key the chart was not given. */}}
{{- define "provider-agent.settings" -}}
{{- $toml := fromToml .Values.config }}
{{- if hasKey $toml "Error" }}
{{- fail (printf "config: not valid TOML: %s" (get $toml "Error")) }}
{{- end }}
{{- $addr := dig "observability" "prometheus_addr" "127.0.0.1:9821" $toml | toString }}
{{- if not (regexMatch "^(\\[[0-9A-Fa-f:.]+\\]|[\\w.-]+):[0-9]{1,5}$" $addr) }}
{{- fail (printf "config: [observability] prometheus_addr %q: the pod needs the HTTP endpoint for its probes; set it to \"0.0.0.0:PORT\"" $addr) }}
{{- end }}
{{- $host := regexReplaceAll ":[0-9]+$" $addr "" }}
{{- if or (hasPrefix "127." $host) (eq $host "localhost" "[::1]") }}
{{- fail (printf "config: [observability] prometheus_addr %q is loopback: the kubelet probes the pod's IP; set it to \"0.0.0.0:PORT\"" $addr) }}
{{- end }}
{{- $port := regexReplaceAll "^.*:" $addr "" | atoi }}
{{- if or (lt $port 1) (gt $port 65535) }}
{{- fail (printf "config: [observability] prometheus_addr %q: the port must be 1-65535" $addr) }}
{{- end }}
{{- $drain := dig "state" "drain_timeout_s" 60 $toml | float64 }}
{{- $keyPath := dig "identity" "key_path" "" $toml | toString }}
{{- $stateDir := trimSuffix "/" .Values.state.mountPath }}
{{- if and $keyPath (not (hasPrefix (printf "%s/" $stateDir) $keyPath)) }}
{{- fail (printf "config: [identity] key_path %q is not under state.mountPath %q: the node would lose its provider_id with the pod; leave key_path out ($STATE_DIRECTORY/identity.key is used)" $keyPath $stateDir) }}
{{- end }}
{{- $envs := list }}
{{- range $index, $backend := (get $toml "backends" | default list) }}
{{- with $backend.api_key_env }}
{{- if and (not $.Values.apiKeys.existingSecret) (not (hasKey $.Values.apiKeys.values .)) }}
{{- fail (printf "config: backends[%d].api_key_env names %s, but apiKeys.values has no key %s (nor is apiKeys.existingSecret set)" $index . .) }}
{{- end }}
{{- $envs = append $envs . }}
{{- end }}
{{- end }}
{{- dict "port" $port "grace" (add (int (ceil $drain)) .Values.terminationGraceMarginSeconds) "apiKeyEnvs" ($envs | uniq) | toJson }}
{{- end }}
