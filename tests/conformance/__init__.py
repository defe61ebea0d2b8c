"""The Autobahn|Testsuite against ``/echo``, and the runner ``scripts/run-conformance`` uses."""
