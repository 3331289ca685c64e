{{/*
Chart name, truncated to the 63 characters a label value may hold.
*/}}
{{- define "recserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every resource: <release>-<chart>, or <release> when it already contains the chart name.
Truncated to 52 characters so that "-<component>" suffixes (the longest is "-routing-policy") stay within 63.
*/}}
{{- define "recserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label (never part of a selector).
*/}}
{{- define "recserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Namespace of the namespaced resources.
*/}}
{{- define "recserve.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource. Call with (dict "ctx" $ "component" "triton").
*/}}
{{- define "recserve.labels" -}}
helm.sh/chart: {{ include "recserve.chart" .ctx }}
{{ include "recserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: recserve
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: stable across upgrades (no chart or app version). Call with (dict "ctx" $ "component" "triton").
*/}}
{{- define "recserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "recserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/*
Resource names per component.
*/}}
{{- define "recserve.triton.fullname" -}}
{{- printf "%s-triton" (include "recserve.fullname" .) }}
{{- end }}

{{- define "recserve.router.fullname" -}}
{{- printf "%s-router" (include "recserve.fullname" .) }}
{{- end }}

{{- define "recserve.operator.fullname" -}}
{{- printf "%s-operator" (include "recserve.fullname" .) }}
{{- end }}

{{- define "recserve.training.fullname" -}}
{{- printf "%s-training" (include "recserve.fullname" .) }}
{{- end }}

{{/*
A training pod's spec (the RayCluster's head and workers): no API token, restricted security contexts, /tmp
and /dev/shm (Ray's session files and object store) as emptyDirs under a read-only root filesystem.
Call with (dict "ctx" $ "name" "ray-head" "resources" ... "ports" list).
*/}}
{{- define "recserve.training.podSpec" -}}
{{- $t := .ctx.Values.training -}}
serviceAccountName: {{ include "recserve.training.fullname" .ctx }}
automountServiceAccountToken: false
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $t.podSecurityContext | nindent 2 }}
containers:
  - name: {{ .name }}
    image: {{ include "recserve.image" .ctx }}
    imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
    {{- with .ports }}
    ports:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    env:
      - name: HOME
        value: /tmp
      - name: RAY_worker_niceness
        value: "0"
    resources:
      {{- toYaml .resources | nindent 6 }}
    securityContext:
      {{- toYaml $t.securityContext | nindent 6 }}
    volumeMounts:
      - name: tmp
        mountPath: /tmp
      - name: shm
        mountPath: /dev/shm
      {{- with $t.rayCluster.volumeMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
volumes:
  - name: tmp
    emptyDir: {}
  - name: shm
    emptyDir:
      medium: Memory
  {{- with $t.rayCluster.volumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $t.rayCluster.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $t.rayCluster.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "recserve.engineBuild.fullname" -}}
{{- printf "%s-engine-build" (include "recserve.fullname" .) }}
{{- end }}

{{/*
The routing-policy ConfigMap: written by the operator, mounted by the router. The chart does not own it
(a helm upgrade would otherwise reset the weights of a rollout in progress).
*/}}
{{- define "recserve.policyConfigMap" -}}
{{- default (printf "%s-routing-policy" (include "recserve.fullname" .)) .Values.router.policyConfigMap }}
{{- end }}

{{/*
ServiceAccount names.
*/}}
{{- define "recserve.triton.serviceAccountName" -}}
{{- if .Values.triton.serviceAccount.create }}
{{- default (include "recserve.triton.fullname" .) .Values.triton.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.triton.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "recserve.router.serviceAccountName" -}}
{{- if .Values.router.serviceAccount.create }}
{{- default (include "recserve.router.fullname" .) .Values.router.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.router.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The router's drain after SIGTERM, checked against the grace period that must also cover the shutdown. */}}
{{- define "recserve.router.drainSeconds" -}}
{{- $drain := int .Values.router.drainSeconds }}
{{- if ge $drain (int .Values.router.terminationGracePeriodSeconds) }}
{{- fail (printf "router.drainSeconds (%d) must be less than router.terminationGracePeriodSeconds (%d): the pod is killed when the grace period ends, before Serve and Triton have shut down" $drain (int .Values.router.terminationGracePeriodSeconds)) }}
{{- end }}
{{- $drain }}
{{- end }}

{{- define "recserve.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "recserve.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Images.
*/}}
{{- define "recserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "recserve.triton.image" -}}
{{- printf "%s:%s" .Values.triton.image.repository (default (printf "%s-triton" .Chart.AppVersion) .Values.triton.image.tag) }}
{{- end }}

{{/*
The model repository PVC (chart-created or existing); empty with object storage.
*/}}
{{- define "recserve.modelRepository.claimName" -}}
{{- if eq .Values.modelRepository.type "pvc" }}
{{- default (printf "%s-models" (include "recserve.fullname" .)) .Values.modelRepository.pvc.existingClaim }}
{{- end }}
{{- end }}

{{/*
What tritonserver gets as --model-repository.
*/}}
{{- define "recserve.modelRepository.url" -}}
{{- if eq .Values.modelRepository.type "pvc" }}
{{- .Values.modelRepository.mountPath }}
{{- else }}
{{- required "modelRepository.objectStorage.url is required with modelRepository.type=objectStorage (s3://, gs:// or as://)" .Values.modelRepository.objectStorage.url }}
{{- end }}
{{- end }}

{{/*
The claim the router reads its files from.
*/}}
{{- define "recserve.router.artifactsClaim" -}}
{{- if .Values.router.artifacts.existingClaim }}
{{- .Values.router.artifacts.existingClaim }}
{{- else if eq .Values.modelRepository.type "pvc" }}
{{- include "recserve.modelRepository.claimName" . }}
{{- else }}
{{- fail "router.artifacts.existingClaim is required with modelRepository.type=objectStorage: the router reads its edge models, catalogs and preprocessing from local files" }}
{{- end }}
{{- end }}

{{/*
Namespaces the operator watches (a list, as YAML).
*/}}
{{- define "recserve.operator.namespaces" -}}
{{- if .Values.operator.watchNamespaces }}
{{- toYaml (uniq .Values.operator.watchNamespaces) }}
{{- else }}
{{- toYaml (list (include "recserve.namespace" .)) }}
{{- end }}
{{- end }}

{{/*
Routing-policy ConfigMaps the operator may read and patch (a list, as YAML).
*/}}
{{- define "recserve.operator.policyConfigMapNames" -}}
{{- if .Values.operator.rbac.policyConfigMapNames }}
{{- toYaml (uniq .Values.operator.rbac.policyConfigMapNames) }}
{{- else }}
{{- toYaml (list (include "recserve.policyConfigMap" .)) }}
{{- end }}
{{- end }}

{{/*
The router's config file (router.yaml), from router.config plus what the chart knows.
*/}}
{{- define "recserve.router.config" -}}
{{- $cfg := deepCopy .Values.router.config }}
{{- if not (or (hasKey (default dict $cfg.models) $cfg.default_model) (hasKey (default dict $cfg.searches) $cfg.default_model)) }}
{{- fail (printf "router.config.default_model %q is not among router.config.models or searches (%s)" $cfg.default_model (concat (keys (default dict $cfg.models)) (keys (default dict $cfg.searches)) | sortAlpha | join ", ")) }}
{{- end }}
{{- $_ := set $cfg "triton_url" (printf "%s:%d" (include "recserve.triton.fullname" .) (int .Values.triton.ports.grpc)) }}
{{- $_ := set $cfg "policy_file" "/etc/recserve/policy/policy.json" }}
{{- $_ := set $cfg "grpc_port" (int .Values.router.ports.grpc) }}
{{- $_ := set $cfg "http_port" (int .Values.router.ports.http) }}
{{- $_ := set $cfg "http_host" "0.0.0.0" }}
{{- if .Values.router.rayService.enabled }}
{{- $_ := set $cfg "ingress" "proxy" }}
{{- $sa := .Values.router.rayService.serveAutoscaling }}
{{- if $sa.enabled }}
{{- $_ := set $cfg "autoscaling" (dict "min_replicas" (int $sa.minReplicas) "max_replicas" (int $sa.maxReplicas) "target_ongoing_requests" $sa.targetOngoingRequests) }}
{{- end }}
{{- else if and (ne (toString $cfg.ingress) "proxy") (ne (int $cfg.num_replicas) 1) }}
{{- fail (printf "router.config.ingress %s serves from one replica per pod, got num_replicas %d: scale with router.replicas, or set router.config.ingress: proxy" (toString $cfg.ingress) (int $cfg.num_replicas)) }}
{{- end }}
{{- if and $cfg.autoscaling (ne (toString $cfg.ingress) "proxy") }}
{{- fail (printf "router.config.autoscaling needs ingress proxy (got %s): in Deployment mode scale pods with router.autoscaling" (toString $cfg.ingress)) }}
{{- end }}
{{- if not $cfg.autoscaling }}
{{- $_ := unset $cfg "autoscaling" }}
{{- end }}
{{- if not $cfg.retriever }}
{{- $_ := unset $cfg "retriever" }}
{{- end }}
{{- if eq (toString $cfg.default_budget_ms) "<nil>" }}
{{- $_ := unset $cfg "default_budget_ms" }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
Container resources with the GPU count added to requests and limits. Call with (dict "resources" ... "gpus" N).
*/}}
{{- define "recserve.gpuResources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- $gpus := int .gpus }}
{{- if gt $gpus 0 }}
{{- $requests := default dict $res.requests }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $requests "nvidia.com/gpu" $gpus }}
{{- $_ := set $limits "nvidia.com/gpu" $gpus }}
{{- $_ := set $res "requests" $requests }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/*
One engine-compile container: `recserve build SOURCE --name NAME --target tensorrt`. Call with (dict "ctx" $ "model" m).
*/}}
{{- define "recserve.engineBuild.container" -}}
{{- $ctx := .ctx }}
{{- $m := .model -}}
- name: {{ printf "build-%s" ($m.name | lower | replace "_" "-") | trunc 63 | trimSuffix "-" }}
  image: {{ include "recserve.triton.image" $ctx }}
  imagePullPolicy: {{ $ctx.Values.triton.image.pullPolicy }}
  args:
    - recserve
    - build
    - {{ required "engineBuild.models[].source is required" $m.source | quote }}
    - --name={{ required "engineBuild.models[].name is required" $m.name }}
    - --target=tensorrt
    - --repository={{ $ctx.Values.modelRepository.mountPath }}
    - --profile=/etc/recserve/build/profile.yaml
    {{- with $m.precision }}
    - --precision={{ . }}
    {{- end }}
    {{- if not (kindIs "invalid" $m.version) }}
    - --version={{ $m.version }}
    {{- end }}
  env:
    - name: HOME
      value: /tmp
    - name: PYTHONDONTWRITEBYTECODE
      value: "1"
  resources:
    {{- include "recserve.gpuResources" (dict "resources" $ctx.Values.engineBuild.resources "gpus" $ctx.Values.engineBuild.gpus) | nindent 4 }}
  securityContext:
    {{- toYaml $ctx.Values.triton.securityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ $ctx.Values.modelRepository.mountPath }}
    - name: profile
      mountPath: /etc/recserve/build
      readOnly: true
    - name: tmp
      mountPath: /tmp
{{- end }}

{{/*
A short hash of what the engine-compile Job builds (models, profile, image, GPUs).
*/}}
{{- define "recserve.engineBuild.hash" -}}
{{- $spec := dict "models" .Values.engineBuild.models "profile" .Values.engineBuild.profile "image" (include "recserve.triton.image" .) "gpus" .Values.engineBuild.gpus }}
{{- toJson $spec | sha256sum | trunc 8 }}
{{- end }}

{{/*
The router's volumes and mounts (Deployment and RayService pods alike).
*/}}
{{- define "recserve.router.volumeMounts" -}}
- name: config
  mountPath: /etc/recserve/router.yaml
  subPath: router.yaml
  readOnly: true
# the routing policy: a directory mount (not subPath), so ConfigMap updates reach the running router
- name: policy
  mountPath: /etc/recserve/policy
  readOnly: true
- name: artifacts
  mountPath: {{ .Values.modelRepository.mountPath }}
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{- define "recserve.router.volumes" -}}
- name: config
  configMap:
    name: {{ include "recserve.router.fullname" . }}
- name: policy
  configMap:
    name: {{ include "recserve.policyConfigMap" . }}
    # written by the operator at the first rollout; until then the router uses Triton's default versions
    optional: true
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ include "recserve.router.artifactsClaim" . }}
    readOnly: true
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.router.tmpSize }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.router.shmSize }}
{{- end }}

{{/*
Environment of the Ray containers of the RayService: the builder module on the path, Ray Serve's
latency settings (`recserve route` sets the same ones itself).
*/}}
{{- define "recserve.router.rayEnv" -}}
- name: HOME
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD
  value: "0"
- name: RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP
  value: "0"
- name: RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE
  value: "1000"
- name: RAY_SERVE_PROXY_USE_GRPC
  value: "1"
# the router replicas at the default priority, not Ray's 15 for batch workers (recserve/serving/app.py)
- name: RAY_worker_niceness
  value: "0"
{{- with .Values.router.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The operator's RBAC rules: exactly what it touches (the real API server's audit log of a rollout run by
the chart's ServiceAccount shows these requests and no others: tests/e2e/test_operator_apiserver.py).
kopf lists and watches ModelRollouts, patches them (finalizers, its progress annotations) and their
status subresource, and creates events; the operator reads, creates and patches the routing-policy
ConfigMap. create cannot be limited by name (the object does not exist yet); get and patch are limited
to the policy ConfigMaps.
*/}}
{{- define "recserve.operator.rules" -}}
- apiGroups: ["recserve.io"]
  resources: ["modelrollouts"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["recserve.io"]
  resources: ["modelrollouts/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["configmaps"]
  resourceNames:
    {{- include "recserve.operator.policyConfigMapNames" . | nindent 4 }}
  verbs: ["get", "patch"]
# the Triton pods behind a rollout's triton.service: model control and metrics go to each pod
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list"]
{{- end }}
