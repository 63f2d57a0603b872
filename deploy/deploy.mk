# Kubernetes deployment targets (included by the main Makefile).
#   make render   render every overlay to build/k8s/<overlay>.yaml (offline)
#   make deploy   apply the production (gpu) overlay to the current kubectl context
#   make images   build the CPU and the CUDA image (needs docker)
#   make image-check  build the CPU image with no registry and run a device
#                 through it (slow, needs disk; docs/images.md)

OVERLAYS := gpu cpu-lite gpu-ingress-nginx gpu-gke gpu-istio
K8S_DIR := deploy/k8s
K8S_BUILD := build/k8s
IMAGE ?= registry.example.com/speechfront
IMAGE_VERSION ?= 0.1.0
CUDA_BASE_IMAGE ?= nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04
CUDA_TORCH_INDEX ?= https://download.pytorch.org/whl/cu126
SCHEMA_CHECK := deploy/schema-check

.PHONY: render deploy images image-check deploy-tools constraints

render: $(addprefix $(K8S_BUILD)/,$(addsuffix .yaml,$(OVERLAYS)))

$(K8S_BUILD)/%.yaml: $(shell find $(K8S_DIR) -type f)
	mkdir -p $(K8S_BUILD)
	kubectl kustomize $(K8S_DIR)/overlays/$* > $@.tmp
	mv $@.tmp $@

# A Job's pod template cannot change in place: the finished models Job goes
# first, and the apply creates it again (it only verifies what is installed).
deploy:
	kubectl -n speechfront delete job models --ignore-not-found
	kubectl apply -k $(K8S_DIR)/overlays/gpu

images:
	docker build -f deploy/docker/Dockerfile -t $(IMAGE):$(IMAGE_VERSION)-cpu .
	# The CUDA image reads its weights from the model volume: no lite weights.
	docker build -f deploy/docker/Dockerfile \
		--build-arg BASE_IMAGE=$(CUDA_BASE_IMAGE) \
		--build-arg TORCH_INDEX_URL=$(CUDA_TORCH_INDEX) \
		--build-arg BAKE_LITE_MODELS=false \
		-t $(IMAGE):$(IMAGE_VERSION)-cuda .

# Engine (Debian's docker.io) and base image (debootstrap) made here, the CPU
# image built from them, its services started as the cpu-lite overlay runs
# them and a simulated device's transcript checked. Not part of make test.
image-check:
	scripts/image/image_check.sh

# The image's package versions: what the virtual environment (and so the
# tests) runs, torch aside (the Dockerfile pins it per index).
constraints:
	{ sed -n '1,4p' deploy/docker/constraints.txt; \
	  .venv/bin/pip freeze --all --exclude-editable | grep -v -e '^#' -e '^torch==' -e '^pip=='; } > deploy/docker/constraints.txt.new
	mv deploy/docker/constraints.txt.new deploy/docker/constraints.txt

# Gateway API schemas (npm) for the offline manifest tests.
deploy-tools: $(SCHEMA_CHECK)/node_modules/.installed

$(SCHEMA_CHECK)/node_modules/.installed: $(SCHEMA_CHECK)/package.json $(SCHEMA_CHECK)/package-lock.json
	npm ci --prefix $(SCHEMA_CHECK) --no-audit --no-fund
	touch $@

setup: deploy-tools
