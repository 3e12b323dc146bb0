# Container images: the one place their names, tags and build commands live. Included by the Makefile.
#
#   make images            build the web, worker, worker-gpu, worker-spark and operator images (needs Docker)
#   make image-<name>      one of them (web, worker, worker-gpu, worker-spark, operator)
#   make lint-images       hadolint every Dockerfile

# The chart's values.yaml defaults: ghcr.io/inferstack/<name>:<appVersion>.
IMAGE_REGISTRY ?= ghcr.io/inferstack
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' charts/inferstack/Chart.yaml)
HADOLINT ?= $(BIN)/hadolint
DOCKER ?= docker
DOCKERFILES := images/web/Dockerfile images/worker/Dockerfile images/worker/Dockerfile.gpu images/worker/Dockerfile.spark \
	operator/Dockerfile

.PHONY: docker-check images image-web image-worker image-worker-gpu image-worker-spark image-operator lint-images

lint: lint-images

lint-images: venv
	$(HADOLINT) $(DOCKERFILES)

# Build context is the repo root (see .dockerignore). BuildKit is required (RUN --mount).
images: image-web image-worker image-worker-gpu image-worker-spark image-operator

docker-check:
	@$(DOCKER) info >/dev/null 2>&1 || { echo "no Docker engine reachable with '$(DOCKER)': building images needs one" >&2; exit 1; }

# image-<name>: its Dockerfile, tagged $(IMAGE_REGISTRY)/<name>:$(IMAGE_TAG).
define image_rule
image-$(1): docker-check
	DOCKER_BUILDKIT=1 $$(DOCKER) build -f $(2) -t $$(IMAGE_REGISTRY)/$(1):$$(IMAGE_TAG) .
endef
$(eval $(call image_rule,web,images/web/Dockerfile))
$(eval $(call image_rule,worker,images/worker/Dockerfile))
$(eval $(call image_rule,worker-gpu,images/worker/Dockerfile.gpu))
$(eval $(call image_rule,worker-spark,images/worker/Dockerfile.spark))
$(eval $(call image_rule,operator,operator/Dockerfile))
