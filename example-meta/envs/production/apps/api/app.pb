
api
productionprj-api"api.example.com(€Ðê¶·3