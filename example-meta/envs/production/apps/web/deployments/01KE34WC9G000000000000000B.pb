
01KE34WC9G000000000000000Bweb
production"01KE34VFZ8000000000000000A(2ï
01KE34VF000000000000000004web
production"Gsha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc8ê?B
VERSIONv3R
/healthzË ÙZÄÄ`jwww.example.comzT
"https://github.com/example/web.gitmain(0000000000000000000000000000019b864dbc00ÄÄ¯∂≤∏3:$
01KE34VFZ800000000000000Z8node-1:$
01KE34VFZ800000000000000Z9node-2:$
01KE34VFZ800000000000000ZAnode-3@∞‚∏≤∏3