"""The bundled sample app (`changeover.demo.app`) and its release commands
(`changeover.demo.appctl`): a small stand-in for a cluster of app servers."""
