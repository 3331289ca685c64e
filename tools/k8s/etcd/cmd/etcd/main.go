// Command etcd is the etcd server. The upstream binary's main package lives at the root of the
// go.etcd.io/etcd/v3 module, which is not meant to be depended on; this is the same three lines
// against the published server module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
