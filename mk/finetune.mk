# inferstack finetune (and anything else on PySpark) needs a Java runtime; Debian's 17 is the one
# we test with. Included by the Makefile.

.PHONY: java

test: java

java:
	@command -v java >/dev/null 2>&1 || { \
		echo "installing Java 17 (for PySpark) from Debian"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null; }
