package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// pki is the set of files under DIR/pki that the cluster uses. It is created once per DIR
// and reused on later `up`s, so kubeconfigs and tokens minted earlier stay valid.
type pki struct {
	dir string
}

func (p pki) path(name string) string { return filepath.Join(p.dir, name) }

func (p pki) CACert() string      { return p.path("ca.crt") }
func (p pki) CAKey() string       { return p.path("ca.key") }
func (p pki) ServingCert() string { return p.path("apiserver.crt") }
func (p pki) ServingKey() string  { return p.path("apiserver.key") }
func (p pki) AdminCert() string   { return p.path("admin.crt") }
func (p pki) AdminKey() string    { return p.path("admin.key") }
func (p pki) SAKey() string       { return p.path("sa.key") }
func (p pki) SAPub() string       { return p.path("sa.pub") }
func (p pki) TokenFile() string   { return p.path("tokens.csv") }
func (p pki) AdminToken() string  { return p.path("admin.token") }

const (
	adminUser  = "vncd-testcluster-admin"
	adminGroup = "system:masters"
	certValid  = 10 * 365 * 24 * time.Hour
)

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// ensure creates whatever part of the PKI is missing.
func (p pki) ensure() error {
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return err
	}
	if !exists(p.CACert()) || !exists(p.CAKey()) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{
			Subject:               pkix.Name{CommonName: "vncd-testcluster-ca"},
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			BasicConstraintsValid: true,
			IsCA:                  true,
		}
		der, err := signCert(tmpl, key.Public(), nil, key)
		if err != nil {
			return err
		}
		if err := writeKey(p.CAKey(), key); err != nil {
			return err
		}
		if err := writePEM(p.CACert(), "CERTIFICATE", der, 0o644); err != nil {
			return err
		}
		// A new CA invalidates everything signed by an old one.
		for _, f := range []string{p.ServingCert(), p.ServingKey(), p.AdminCert(), p.AdminKey()} {
			_ = os.Remove(f)
		}
	}
	caCert, caKey, err := p.loadCA()
	if err != nil {
		return err
	}
	if !exists(p.ServingCert()) || !exists(p.ServingKey()) {
		tmpl := &x509.Certificate{
			Subject:     pkix.Name{CommonName: "kube-apiserver"},
			KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
				"kubernetes.default.svc.cluster.local"},
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1"), net.ParseIP("10.0.0.1")},
		}
		if err := p.issue(tmpl, caCert, caKey, p.ServingCert(), p.ServingKey()); err != nil {
			return err
		}
	}
	if !exists(p.AdminCert()) || !exists(p.AdminKey()) {
		if err := p.issueClient(adminUser, []string{adminGroup}, caCert, caKey, p.AdminCert(), p.AdminKey()); err != nil {
			return err
		}
	}
	if !exists(p.SAKey()) || !exists(p.SAPub()) {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return err
		}
		if err := writeKey(p.SAKey(), key); err != nil {
			return err
		}
		pub, err := x509.MarshalPKIXPublicKey(key.Public())
		if err != nil {
			return err
		}
		if err := writePEM(p.SAPub(), "PUBLIC KEY", pub, 0o644); err != nil {
			return err
		}
	}
	if !exists(p.TokenFile()) || !exists(p.AdminToken()) {
		buf := make([]byte, 24)
		if _, err := rand.Read(buf); err != nil {
			return err
		}
		token := hex.EncodeToString(buf)
		// Static token file format: token,user,uid,"group1,group2"
		line := fmt.Sprintf("%s,%s,%s,\"%s\"\n", token, adminUser, adminUser, adminGroup)
		if err := os.WriteFile(p.TokenFile(), []byte(line), 0o600); err != nil {
			return err
		}
		if err := os.WriteFile(p.AdminToken(), []byte(token+"\n"), 0o600); err != nil {
			return err
		}
	}
	return nil
}

func (p pki) loadCA() (*x509.Certificate, crypto.Signer, error) {
	certPEM, err := os.ReadFile(p.CACert())
	if err != nil {
		return nil, nil, err
	}
	block, _ := pem.Decode(certPEM)
	if block == nil {
		return nil, nil, errors.New("ca.crt: no PEM block")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err := os.ReadFile(p.CAKey())
	if err != nil {
		return nil, nil, err
	}
	block, _ = pem.Decode(keyPEM)
	if block == nil {
		return nil, nil, errors.New("ca.key: no PEM block")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, nil, err
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, nil, errors.New("ca.key: not a signing key")
	}
	return cert, signer, nil
}

// issueClient writes a client certificate for user (CN) in groups (O), signed by the CA.
func (p pki) issueClient(user string, groups []string, caCert *x509.Certificate, caKey crypto.Signer, certPath, keyPath string) error {
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: user, Organization: groups},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	return p.issue(tmpl, caCert, caKey, certPath, keyPath)
}

func (p pki) issue(tmpl *x509.Certificate, caCert *x509.Certificate, caKey crypto.Signer, certPath, keyPath string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	der, err := signCert(tmpl, key.Public(), caCert, caKey)
	if err != nil {
		return err
	}
	if err := writeKey(keyPath, key); err != nil {
		return err
	}
	return writePEM(certPath, "CERTIFICATE", der, 0o644)
}

// signCert signs tmpl; a nil parent makes it self-signed.
func signCert(tmpl *x509.Certificate, pub crypto.PublicKey, parent *x509.Certificate, signer crypto.Signer) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(certValid)
	if parent == nil {
		parent = tmpl
	}
	return x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
}

// writeKey writes a private key as PKCS#8 ("PRIVATE KEY"), which Go, rustls and openssl all read.
func writeKey(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return writeFileAtomic(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
