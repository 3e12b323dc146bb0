// etcd, the same server Kubernetes is tested with (etcdmain is what etcd's own binary runs).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
