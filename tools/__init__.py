"""Developer tooling (local stack launcher, Helm driver): not part of any image."""
