// Command etcd-v2 is upstream's etcd server of the v3.5 line, the last one with the v2 API
// (`--enable-v2`), which torchrun's etcd-v2 rendezvous speaks; v3.6 removed it. It mirrors the
// go.etcd.io/etcd/server/v3 module's own main.go, in its own Go module so that these older
// dependencies move neither the Kubernetes binaries nor the control plane's etcd.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
