// Command etcd is etcd's server, built from go.etcd.io/etcd/server/v3 at the version
// kube/go.mod pins (the upstream binary's main lives in a module of its own).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
