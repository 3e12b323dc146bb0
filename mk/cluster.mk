# The local Kubernetes control plane (tools/cluster.py). Included by the Makefile.
#
#   make cluster        etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok in the
#                       foreground; admin kubeconfig in .cluster/kubeconfig; Ctrl-C stops it all
#   make cluster-bin    build (once) the pinned binaries from cluster/go.mod into the cache
#
# The binaries are built with the machine's Go from the Go module proxy, into
# $(INFERSTACK_CLUSTER_CACHE) (default ~/.cache/inferstack/cluster/), keyed by go.mod, go.sum and
# the Go version; Go's own build cache makes a rebuild after a version bump fast.

.PHONY: cluster cluster-bin go-check

go-check:
	@command -v go >/dev/null 2>&1 || { echo "the local control plane is built with Go (1.24 or newer): install it first" >&2; exit 1; }

cluster-bin: venv go-check
	$(BIN)/python -m tools.cluster --build-only

cluster: cluster-bin
	$(BIN)/python -m tools.cluster
