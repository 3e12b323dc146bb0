//go:build tools

// Keeps the kwok command in go.mod's module graph for `go mod tidy`.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
