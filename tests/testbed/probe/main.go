// Command probe runs inside test-bed pods on the real node and prints what it finds, one fact per line.
//
// Usage: probe MODE, where MODE is
//
//	identity   uid and gid, then whether / (read-only root), /writable (a 1777 directory of the image) and /data
//	           (an emptyDir, if mounted) take a file
//	oom        allocate and touch memory until the kernel kills it
//	api        ask the API server, through the `kubernetes` Service and with the pod's projected ServiceAccount
//	           token, who it is (a SelfSubjectReview)
//	terminate  write a termination message and exit 3
//	sleep      sleep until killed
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

const serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: probe identity|oom|api|terminate|sleep")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "identity":
		identity()
	case "oom":
		oom()
	case "api":
		if err := api(); err != nil {
			fmt.Println("api error:", err)
			os.Exit(1)
		}
	case "terminate":
		fmt.Println("terminating")
		if err := os.WriteFile("/dev/termination-log", []byte("probe says goodbye"), 0o644); err != nil {
			fmt.Println("termination message:", err)
		}
		os.Exit(3)
	case "sleep":
		fmt.Println("sleeping")
		for {
			time.Sleep(time.Hour)
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown mode", os.Args[1])
		os.Exit(2)
	}
}

func identity() {
	fmt.Printf("uid=%d gid=%d\n", os.Getuid(), os.Getgid())
	for _, dir := range []string{"/", "/writable", "/data"} {
		if _, err := os.Stat(dir); err != nil {
			continue
		}
		path := dir + "/probe-file"
		if dir == "/" {
			path = "/probe-file"
		}
		if err := os.WriteFile(path, []byte("x"), 0o644); err != nil {
			fmt.Printf("write %s: %v\n", dir, err)
		} else {
			fmt.Printf("write %s: ok\n", dir)
		}
	}
}

func oom() {
	var chunks [][]byte
	for i := 1; ; i++ {
		chunk := make([]byte, 8<<20)
		for j := range chunk {
			chunk[j] = byte(j)
		}
		chunks = append(chunks, chunk)
		fmt.Printf("allocated %d MiB\n", i*8)
	}
}

func api() error {
	token, err := os.ReadFile(serviceAccountDir + "/token")
	if err != nil {
		return err
	}
	ca, err := os.ReadFile(serviceAccountDir + "/ca.crt")
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return fmt.Errorf("no certificate in ca.crt")
	}
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	url := "https://" + net.JoinHostPort(host, port) + "/apis/authentication.k8s.io/v1/selfsubjectreviews"
	body := []byte(`{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}`)
	request, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	request.Header.Set("Authorization", "Bearer "+string(bytes.TrimSpace(token)))
	request.Header.Set("Content-Type", "application/json")
	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	response, err := client.Do(request)
	if err != nil {
		return err
	}
	defer response.Body.Close()
	data, err := io.ReadAll(response.Body)
	if err != nil {
		return err
	}
	if response.StatusCode != http.StatusCreated && response.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", response.Status, data)
	}
	var review struct {
		Status struct {
			UserInfo struct {
				Username string `json:"username"`
			} `json:"userInfo"`
		} `json:"status"`
	}
	if err := json.Unmarshal(data, &review); err != nil {
		return err
	}
	fmt.Printf("api %s as %s\n", host, review.Status.UserInfo.Username)
	return nil
}
