//go:build tools

// Package tools pins the kube-apiserver command into this module's dependency graph;
// ../build.sh builds it with `go build k8s.io/kubernetes/cmd/kube-apiserver`.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
)
