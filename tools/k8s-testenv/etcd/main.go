// Command etcd is upstream's etcd server, built from the go.etcd.io/etcd/server/v3 module.
// It mirrors that module's own main.go. It lives in a separate Go module so that etcd's
// dependencies cannot move the versions the Kubernetes binaries are built with.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
