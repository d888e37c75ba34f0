
web
productionprj-web(€Ðê¶·3