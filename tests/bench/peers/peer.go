// peer.go — the Go clientv3 peer of `make bench` (issue 7).
//
// Built by scripts/bench in GOPATH mode against Debian's golang-etcd-server-dev
// (etcd 3.4 clientv3 and clientv3/concurrency), with no network:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode:$TMP go build -o peer-go peer.go
//
// One workload per run; the result is printed as one JSON line on stdout:
//
//	{"impl":"go","workload":"put_seq","n":2000,"p50_us":..,"p99_us":..,"ops_s":..}
//
// Workloads and their knobs are the same as tests/bench/coord_bench.c and
// tests/bench/peers/peer.py.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/concurrency"
)

var (
	endpoints = flag.String("endpoints", "127.0.0.1:2379", "comma-separated etcd endpoints")
	workload  = flag.String("workload", "put_seq", "put_seq|get_lin|get_ser|put_conc|get_conc|lock_cycle|lock_cycle_session|lock_handoff|watch|fill")
	n         = flag.Int("n", 1000, "iterations (total operations for *_conc)")
	conc      = flag.Int("conc", 64, "concurrent workers for *_conc")
	prefix    = flag.String("prefix", "/bench/go", "key prefix for this run")
	valSize   = flag.Int("value-size", 100, "value size in bytes")
	fillDirs  = flag.Int("dirs", 100, "fill: keys are <prefix>/dNN/kNNNN over this many directories")
	holdMs    = flag.Int("hold-ms", 120, "lock_handoff: how long the holder keeps the lock after the waiter queued")
)

type result struct {
	Impl     string  `json:"impl"`
	Workload string  `json:"workload"`
	N        int     `json:"n"`
	P50      float64 `json:"p50_us"`
	P99      float64 `json:"p99_us"`
	Mean     float64 `json:"mean_us"`
	OpsS     float64 `json:"ops_s"`
	Wall     float64 `json:"wall_s"`
	Error    string  `json:"error,omitempty"`
	// Every sample (µs, 0.01 µs resolution), so that the driver can merge rounds.
	LatUs []float64 `json:"lat_us,omitempty"`
}

func pct(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p*float64(len(sorted)-1) + 0.5)
	return sorted[i]
}

func emit(lat []time.Duration, wall time.Duration) {
	us := make([]float64, len(lat))
	sum := 0.0
	for i, d := range lat {
		us[i] = float64(d.Nanoseconds()) / 1000.0
		sum += us[i]
	}
	sort.Float64s(us)
	r := result{Impl: "go", Workload: *workload, N: len(lat)}
	if len(us) > 0 {
		r.P50, r.P99, r.Mean = pct(us, 0.50), pct(us, 0.99), sum/float64(len(us))
	}
	if wall > 0 {
		r.OpsS = float64(len(lat)) / wall.Seconds()
	}
	r.Wall = wall.Seconds()
	r.LatUs = make([]float64, len(lat))
	for i, d := range lat {
		r.LatUs[i] = float64(d.Nanoseconds()/10) / 100.0
	}
	b, _ := json.Marshal(r)
	fmt.Println(string(b))
}

func fail(err error) {
	b, _ := json.Marshal(result{Impl: "go", Workload: *workload, Error: err.Error()})
	fmt.Println(string(b))
	os.Exit(1)
}

func main() {
	flag.Parse()
	cli, err := clientv3.New(clientv3.Config{Endpoints: strings.Split(*endpoints, ","), DialTimeout: 5 * time.Second})
	if err != nil {
		fail(err)
	}
	defer cli.Close()
	ctx := context.Background()
	val := strings.Repeat("v", *valSize)
	key := *prefix + "/key"
	if _, err := cli.Put(ctx, key, val); err != nil {
		fail(err)
	}

	switch *workload {
	case "put_seq", "get_lin", "get_ser":
		lat := make([]time.Duration, 0, *n)
		start := time.Now()
		for i := 0; i < *n; i++ {
			t0 := time.Now()
			switch *workload {
			case "put_seq":
				_, err = cli.Put(ctx, fmt.Sprintf("%s/k%d", *prefix, i%1000), val)
			case "get_lin":
				_, err = cli.Get(ctx, key)
			default:
				_, err = cli.Get(ctx, key, clientv3.WithSerializable())
			}
			if err != nil {
				fail(err)
			}
			lat = append(lat, time.Since(t0))
		}
		emit(lat, time.Since(start))

	case "put_conc", "get_conc":
		var next int64 = -1
		lats := make([][]time.Duration, *conc)
		var wg sync.WaitGroup
		var firstErr atomic.Value
		start := time.Now()
		for w := 0; w < *conc; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				for {
					i := atomic.AddInt64(&next, 1)
					if i >= int64(*n) {
						return
					}
					t0 := time.Now()
					var err error
					if *workload == "put_conc" {
						_, err = cli.Put(ctx, fmt.Sprintf("%s/c%d", *prefix, i%1000), val)
					} else {
						_, err = cli.Get(ctx, key)
					}
					if err != nil {
						firstErr.Store(err)
						return
					}
					lats[w] = append(lats[w], time.Since(t0))
				}
			}(w)
		}
		wg.Wait()
		wall := time.Since(start)
		if e := firstErr.Load(); e != nil {
			fail(e.(error))
		}
		var all []time.Duration
		for _, l := range lats {
			all = append(all, l...)
		}
		emit(all, wall)

	case "lock_cycle":
		s, err := concurrency.NewSession(cli, concurrency.WithTTL(10))
		if err != nil {
			fail(err)
		}
		defer s.Close()
		m := concurrency.NewMutex(s, *prefix+"/lock")
		lat := make([]time.Duration, 0, *n)
		start := time.Now()
		for i := 0; i < *n; i++ {
			t0 := time.Now()
			if err := m.Lock(ctx); err != nil {
				fail(err)
			}
			if err := m.Unlock(ctx); err != nil {
				fail(err)
			}
			lat = append(lat, time.Since(t0))
		}
		emit(lat, time.Since(start))

	case "lock_cycle_session":
		// What etcdctl lock and many Go programs do: a session (a lease) per
		// lock, so LeaseGrant + Txn + Delete + LeaseRevoke per cycle.
		lat := make([]time.Duration, 0, *n)
		start := time.Now()
		for i := 0; i < *n; i++ {
			t0 := time.Now()
			s, err := concurrency.NewSession(cli, concurrency.WithTTL(10))
			if err != nil {
				fail(err)
			}
			m := concurrency.NewMutex(s, *prefix+"/lock")
			if err := m.Lock(ctx); err != nil {
				fail(err)
			}
			if err := m.Unlock(ctx); err != nil {
				fail(err)
			}
			s.Close()
			lat = append(lat, time.Since(t0))
		}
		emit(lat, time.Since(start))

	case "lock_handoff":
		// Two sessions on one client take turns: the holder waits until the
		// other has queued its key, holds hold-ms longer (a waiter that has
		// just queued watches from a past revision, which etcd serves from its
		// 100 ms catch-up loop: the hold measures the steady state), then
		// releases; the latency is from just before Unlock to the moment the
		// waiter's Lock returns.
		pfx := *prefix + "/handoff"
		var ms [2]*concurrency.Mutex
		for i := range ms {
			s, err := concurrency.NewSession(cli, concurrency.WithTTL(10))
			if err != nil {
				fail(err)
			}
			defer s.Close()
			ms[i] = concurrency.NewMutex(s, pfx)
		}
		if err := ms[0].Lock(ctx); err != nil {
			fail(err)
		}
		h := 0
		lat := make([]time.Duration, 0, *n)
		start := time.Now()
		for i := 0; i < *n; i++ {
			w := 1 - h
			got := make(chan time.Time, 1)
			go func() {
				if err := ms[w].Lock(ctx); err != nil {
					fail(err)
				}
				got <- time.Now()
			}()
			for {
				r, err := cli.Get(ctx, pfx+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
				if err != nil {
					fail(err)
				}
				if r.Count >= 2 {
					break
				}
				time.Sleep(200 * time.Microsecond)
			}
			time.Sleep(time.Duration(*holdMs) * time.Millisecond)
			t0 := time.Now()
			if err := ms[h].Unlock(ctx); err != nil {
				fail(err)
			}
			t1 := <-got
			lat = append(lat, t1.Sub(t0))
			h = w
		}
		wall := time.Since(start)
		ms[h].Unlock(ctx)
		emit(lat, wall)

	case "watch":
		wkey := *prefix + "/watched"
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		wch := cli.Watch(clientv3.WithRequireLeader(wctx), wkey)
		// Make sure the watch is registered before the first put.
		if _, err := cli.Put(ctx, wkey, "warmup"); err != nil {
			fail(err)
		}
		<-wch
		lat := make([]time.Duration, 0, *n)
		start := time.Now()
		for i := 0; i < *n; i++ {
			t0 := time.Now()
			if _, err := cli.Put(ctx, wkey, fmt.Sprintf("%d", i)); err != nil {
				fail(err)
			}
			wr, ok := <-wch
			if !ok || wr.Err() != nil || len(wr.Events) == 0 {
				fail(fmt.Errorf("watch ended"))
			}
			lat = append(lat, time.Since(t0))
		}
		emit(lat, time.Since(start))

	case "fill":
		// n keys of value-size bytes under <prefix>/dNN/kNNNNNN, 128 puts a Txn.
		var ops []clientv3.Op
		var wg sync.WaitGroup
		sem := make(chan struct{}, 8)
		start := time.Now()
		flush := func(ops []clientv3.Op) {
			sem <- struct{}{}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
					fail(err)
				}
			}()
		}
		for i := 0; i < *n; i++ {
			k := fmt.Sprintf("%s/d%02d/k%06d", *prefix, i%*fillDirs, i)
			ops = append(ops, clientv3.OpPut(k, val))
			if len(ops) == 128 {
				flush(ops)
				ops = nil
			}
		}
		if len(ops) > 0 {
			flush(ops)
		}
		wg.Wait()
		emit(nil, time.Since(start))

	default:
		fail(fmt.Errorf("unknown workload %q", *workload))
	}
}
