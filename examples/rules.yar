// Example YARA rules for `crit-pageread scan` (yara-x syntax).
// The first finds the secret of the demo's victim (crit_pageread/data/victim.c); the others are the
// kind of indicator an incident responder looks for in a container's memory.

rule crit_pageread_demo_secret : demo
{
  meta:
    description = "the demo victim's secret (it crosses a page and a VMA boundary)"
    severity = 1
  strings:
    $secret = "CRIT-PAGEREAD-SECRET-"
    $shape = /CRIT-PAGEREAD-SECRET-[0-9]+-spans-two-pages/
  condition:
    $secret and $shape
}

rule pem_private_key : credential
{
  meta:
    description = "a PEM private key in memory"
    severity = 8
  strings:
    $begin = /-----BEGIN (RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----/
  condition:
    $begin
}

rule aws_access_key : credential
{
  meta:
    description = "an AWS access key id next to a secret key assignment"
    severity = 7
  strings:
    $id = /\b(AKIA|ASIA)[0-9A-Z]{16}\b/
    $secret = /aws_secret_access_key\s*[=:]\s*[A-Za-z0-9\/+]{40}/ nocase
  condition:
    $id or $secret
}
